"""Fixtures shared by the cluster tests in this folder."""

from __future__ import annotations

import pytest
from cluster_services import CIFAR10, Services
from needs import need_dir


@pytest.fixture(scope="session")
def svc(tmp_path_factory):
    """One loopback Ray head + MLflow server for the whole session (a cold start costs a minute on 2 cores)."""
    need_dir(CIFAR10 / "train", "CIFAR-10 JPEG folders")
    svc = Services(tmp_path_factory.mktemp("cluster"))
    yield svc
    svc.stop()
