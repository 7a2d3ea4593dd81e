"""Shared fixtures: real data paths, one local Ray head per session (token auth, every port on loopback: the head
``vitpipe run`` starts, via ``raytools.ensure_ray``), MLflow sqlite.

CI policy (tests/support/needs.py): a missing dataset or test dependency skips here with the reason, and fails the
test when ``CI=true``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from needs import need_dir, need_module

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
CIFAR10 = SHARED_DATA / "cifar10"
HYMENOPTERA = SHARED_DATA / "hymenoptera"

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    need_dir(CIFAR10 / "train", "CIFAR-10 JPEG folders (../shared/data beside the repo)")
    return CIFAR10


@pytest.fixture(scope="session")
def hymenoptera_root() -> Path:
    need_dir(HYMENOPTERA / "train", "hymenoptera photos")
    return HYMENOPTERA


S3_BUCKET = "vitpipe-test"
S3_CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3():
    """A real S3 endpoint: moto's server on 127.0.0.1 with an empty bucket `S3_BUCKET`; yields fsspec/s3fs
    storage options ({"endpoint_url": ...}). Credentials are fake and set in the environment for the module."""
    import socket
    import urllib.request

    moto_server = need_module("moto.server", "the s3 fixture needs moto[server] (test extra)")
    s3fs = need_module("s3fs", "the s3 fixture needs s3fs (test extra)")
    mp = pytest.MonkeyPatch()
    for k, v in S3_CREDS.items():
        mp.setenv(k, v)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    # moto's backends are process-global: a server started earlier in this session left its buckets behind
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=10).read()
    opts = {"endpoint_url": url}
    s3fs.S3FileSystem(**opts, skip_instance_cache=True).mkdir(S3_BUCKET)
    try:
        yield opts
    finally:
        server.stop()
        mp.undo()


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri():
    """A test that calls ``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``; every later run in this
    process, and every Ray node started after it, would track there. Put both back after each test."""
    from mlflow.tracking._tracking_service import utils

    prev_uri, prev_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if utils._tracking_uri != prev_uri:
        utils.set_tracking_uri(prev_uri)
    if prev_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = prev_env


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (a cold start costs ~30-60 s on 2 cores), started exactly as
    `vitpipe run` starts it: token auth with the vitpipe token file, every port on 127.0.0.1."""
    import ray

    from vitpipe.jobs.core.raytools import ensure_ray

    ensure_ray(num_cpus=2)
    yield ray
    _shutdown_ray(ray)


def _shutdown_ray(ray, timeout_s: float = 20.0) -> None:
    """ray.shutdown() can block forever joining a log-subscriber thread when the GCS is already gone; bound it so a
    finished suite never hangs CI, and drop Ray's atexit hook that would block the same way. A normal shutdown takes
    1-5 s on 2 cores; when it blocks, waiting longer never helped (the whole suite paid 60 s for it), so the bound is
    short and the warning carries where it blocked. The head's processes exit with this one either way."""
    import atexit
    import sys
    import threading
    import traceback

    t = threading.Thread(target=ray.shutdown, daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        atexit.unregister(ray.shutdown)
        import warnings

        frame = sys._current_frames().get(t.ident)
        where = "".join(traceback.format_stack(frame)[-4:]) if frame is not None else "?"
        warnings.warn(f"ray.shutdown() did not return within {timeout_s:.0f}s; leaving the local Ray to exit with "
                      f"us. It was blocked in:\n{where}")


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """Leave without interpreter teardown once pytest has reported: a local Ray whose shutdown had to be abandoned
    (see `_shutdown_ray`) can segfault in its C++ threads at exit, turning a green run into a crash exit code."""
    if _EXIT_STATUS and os.environ.get("VITPIPE_TEST_HARD_EXIT", "1") == "1":
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[-1])
