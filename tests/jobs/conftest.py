"""Fixtures shared by the cluster tests in this folder."""

from __future__ import annotations

import pytest
from cluster_services import CIFAR10, TINY_SETS, Services, tiny_overrides
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



@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, cifar10_root, ray_local):
    """One ``vitpipe run tiny`` of every stage through the CLI (``cluster_services.TINY_SETS``), its output piped
    and every progress update printed as a line, shared by the tests that read a finished run: its console output
    and log (test_output), its store, MLflow runs, registered model and cached reruns (test_pipeline_integration).
    A tiny run costs 1-2 minutes on 2 cores; each of those tests paid for its own before."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from vitpipe.jobs.cli import app
    from vitpipe.jobs.core.store import Store
    from vitpipe.jobs.run import view as view_mod

    root = tmp_path_factory.mktemp("tiny-run") / "store"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(view_mod.EVERY_ENV, "0")  # every progress update as a line: test_output checks all of them
        res = CliRunner().invoke(app, ["run", *tiny_overrides(root)])
    runs = sorted((root / "runs").iterdir()) if (root / "runs").is_dir() else []
    store = Store(str(root))
    record = store.load_run(runs[0].name) if len(runs) == 1 else None
    results = {s: store.load_result(s, v["key"]) for s, v in record["stages"].items()} if record else {}
    return SimpleNamespace(output=res.output, exit_code=res.exit_code, exception=res.exception, store=root,
                           sets=list(TINY_SETS), run_dir=runs[0] if runs else None, record=record, results=results)
