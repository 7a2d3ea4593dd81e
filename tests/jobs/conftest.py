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


@pytest.fixture(scope="session")
def process_group():
    """A one-rank gloo group, as DeepSpeed needs one in this process. Kept for the session: DeepSpeed caches the
    group, so a later module cannot bring up another one (tests that fork must spawn instead)."""
    import os
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    yield
