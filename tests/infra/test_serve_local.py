"""infra/mlflow/serve_local.sh: argument errors, and (integration) a real MLflow server on 127.0.0.1 with sqlite."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "infra" / "mlflow" / "serve_local.sh"
VENV_BIN = str(Path(sys.executable).parent)


def run_script(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=full_env, timeout=30)


@pytest.mark.parametrize("args,message", [
    (("--port", "abc"), "--port must be 1-65535"),
    (("--port", "70000"), "--port must be 1-65535"),
    (("--bogus",), "unknown argument '--bogus'"),
    (("--dir",), "--dir needs a value"),
])
def test_argument_errors_are_one_line(args, message, tmp_path):
    proc = run_script(*args, "--dir", str(tmp_path)) if args != ("--dir",) else run_script(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr


def test_missing_mlflow_is_reported(tmp_path):
    proc = run_script("--dir", str(tmp_path), MLFLOW_BIN=str(tmp_path / "no-such-mlflow"))
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_help_prints_usage():
    proc = run_script("--help")
    assert proc.returncode == 0 and "Usage: infra/mlflow/serve_local.sh" in proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(pid: int, port: int) -> set[str]:
    """IP addresses the server's process tree listens on for `port`."""
    import psutil

    root = psutil.Process(pid)
    addrs = set()
    for proc in [root, *root.children(recursive=True)]:
        try:
            conns = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        addrs |= {c.laddr.ip for c in conns if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    return addrs


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server's whole process group (the script execs mlflow, which forks uvicorn workers)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serves_sqlite_store_on_loopback(tmp_path):
    from mlflow import MlflowClient

    store, port = tmp_path / "store", _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path)}
    for key in [k for k in env if k.startswith("MLFLOW_")]:
        env.pop(key)  # a developer's tracking settings must not leak into the server under test
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dir", str(store), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"server exited early:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
                    if resp.status == 200 and resp.read().strip() == b"OK":
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no /health in 180 s:\n{(tmp_path / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)

        assert _listening_addresses(proc.pid, port) == {"127.0.0.1"}

        client = MlflowClient(tracking_uri=uri)
        experiment_id = client.create_experiment("vitpipe-infra-smoke")
        run = client.create_run(experiment_id, tags={"vitpipe.test": "serve_local"})
        client.log_metric(run.info.run_id, "loss", 0.25, step=3)
        client.log_text(run.info.run_id, "hello from vitpipe", "notes/hello.txt")
        client.set_terminated(run.info.run_id)

        fetched = client.get_run(run.info.run_id)
        assert fetched.data.metrics["loss"] == 0.25 and fetched.info.status == "FINISHED"
        # The experiment lives in the sqlite file the script was told to use ...
        with sqlite3.connect(store / "mlflow.db") as db:
            names = {row[0] for row in db.execute("select name from experiments")}
        assert "vitpipe-infra-smoke" in names
        # ... and artifacts went through the server into the local artifact folder.
        uploaded = list((store / "artifacts").rglob("hello.txt"))
        assert len(uploaded) == 1 and uploaded[0].read_text() == "hello from vitpipe"
    finally:
        _stop(proc)
        log.close()
    assert proc.poll() is not None, "server still running after SIGTERM/SIGKILL"
