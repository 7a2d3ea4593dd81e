"""Fixtures shared by the cluster tests in this folder."""

from __future__ import annotations

import pytest
from cluster_services import CIFAR10, Services


@pytest.fixture(scope="session")
def svc(tmp_path_factory):
    """One loopback Ray head + MLflow server for the whole session (a cold start costs a minute on 2 cores)."""
    if not CIFAR10.joinpath("train").is_dir():
        pytest.skip(f"CIFAR-10 JPEG folders not found at {CIFAR10}")
    svc = Services(tmp_path_factory.mktemp("cluster"))
    yield svc
    svc.stop()
