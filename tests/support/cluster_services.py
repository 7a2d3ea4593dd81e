"""Real services for the cluster tests (helpers, no tests): a loopback Ray head (+ nodes joined to it, which a test
can lose at once with ``RayNode.kill``) and an MLflow server, each in its own process group and temp dir so they
never touch another session's Ray or MLflow (never `ray stop`).

The ``svc`` fixture (tests/jobs/conftest.py) shares one instance per pytest session between
test_cluster_integration.py and test_mlflow_ui.py; test_multinode.py builds its own (a 1-CPU head, no MLflow).

Exposure: heads start exactly as vitpipe starts its own (``raytools.local_head_env`` + ``LOCAL_HEAD_ARGS``): token
auth with the vitpipe token file (by path, never by value) and single-machine mode, so every Ray port of the head
and of the nodes joined to it listens on 127.0.0.1 (tests/jobs/test_ray_security.py checks it); MLflow listens on
127.0.0.1. Joined nodes (same token, no --node-ip-address) start through ray_join_loopback.py, which keeps Ray from
turning the head's 127.0.0.1 address into the machine's outward IP; they derive 127.0.0.1 as their own IP.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from vitpipe.jobs.core import raytools

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
              token: str | None = None) -> None:
    """Until ``url`` answers 2xx (with ``Authorization: Bearer <token>`` when given: Ray's job API wants it)."""
    t0 = time.monotonic()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited {proc.returncode}: {log.read_text()[-3000:] if log else ''}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3):
                return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s: {log.read_text()[-3000:] if log else ''}")


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """``proc``'s descendants: Ray's worker processes run in sessions of their own and rename themselves
    (``ray::...``), so neither the process group nor a command-line marker reaches them."""
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _kill_group(proc: subprocess.Popen, marker: str) -> None:
    """SIGTERM our process group, then SIGKILL what is left of our process tree and any process still carrying our
    temp-dir marker (ours alone)."""
    tree = _tree(proc)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    time.sleep(1.0)
    _kill_procs(tree)
    _kill_marked(marker)


def _kill_procs(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _kill_marked(marker: str) -> None:
    """SIGKILL every process whose command line carries ``marker`` (a temp dir or port that only ours use)."""
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker and any(marker in a for a in (p.info["cmdline"] or [])):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


class RayNode:
    """``ray start --block`` (head or worker) in its own session; stopped by its process group and temp dir."""

    def __init__(self, temp_dir: str, *, head_address: str | None = None, num_cpus: int = 2,
                 resources: dict[str, float] | None = None, env: dict[str, str] | None = None):
        self.temp_dir = temp_dir
        ports = free_ports(10)
        self.gcs_port, self.dashboard_port = ports[0], ports[1]
        # A joined node goes through ray_join_loopback.py: plain `ray start` would dial the head on the NIC address.
        ray = [str(VENV_BIN / "ray")] if head_address is None else [sys.executable, str(Path(__file__).with_name(
            "ray_join_loopback.py"))]
        args = [*ray, "start", "--block", f"--num-cpus={num_cpus}",
                "--disable-usage-stats", f"--node-manager-port={ports[2]}", f"--object-manager-port={ports[3]}",
                f"--metrics-export-port={ports[4]}", f"--dashboard-agent-listen-port={ports[5]}",
                f"--dashboard-agent-grpc-port={ports[6]}", f"--runtime-env-agent-port={ports[7]}",
                "--object-store-memory=200000000"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        if head_address is None:
            args += ["--head", *raytools.LOCAL_HEAD_ARGS, f"--port={self.gcs_port}",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={ports[8]}",
                     f"--temp-dir={temp_dir}"]
        else:
            args += [f"--address={head_address}"]
        lo = 20000 + (ports[9] % 20000)
        while any(lo <= p <= lo + 200 for p in ports[:9]):  # Ray refuses a worker range that holds a chosen port
            lo = 20000 + (lo + 211) % 20000
        args += [f"--min-worker-port={lo}", f"--max-worker-port={lo + 200}"]
        # nothing of this test process's tracking or cloud settings: a job's driver on this node must get them from
        # its submission, as on a real cluster
        env = {**{k: v for k, v in os.environ.items()
                  if not k.startswith(("RAY_AUTH_", "RAY_ADDRESS", "MLFLOW_", "AWS_"))},
               **raytools.local_head_env(raytools.token_path(), head=head_address is None),
               "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", **(env or {})}
        self.log = Path(temp_dir) / f"ray-start-{ports[2]}.log"
        self.proc = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, cwd=temp_dir)
        self.marker = f"--node-manager-port={ports[2]}" if head_address else temp_dir

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def stop(self) -> None:
        _kill_group(self.proc, self.marker)

    def kill(self) -> None:
        """Lose the node at once, as a machine dies: SIGKILL its process group and tree (its raylet's workers
        included), with no chance to deregister from the head."""
        tree = _tree(self.proc)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _kill_procs(tree)
        _kill_marked(self.marker)
        self.proc.wait(timeout=15)


class MlflowServer:
    """``infra/mlflow/serve_local.sh`` on a free loopback port (sqlite store, artifacts served over HTTP)."""

    def __init__(self, root: str):
        self.port = free_ports(1)[0]
        Path(root).mkdir(parents=True, exist_ok=True)
        self.log = Path(root) / "mlflow.log"
        env = {**os.environ, "MLFLOW_BIN": str(VENV_BIN / "mlflow")}
        self.proc = subprocess.Popen(["bash", str(REPO / "infra/mlflow/serve_local.sh"), "--dir", root, "--port",
                                      str(self.port)], stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.root = root

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _kill_group(self.proc, f"--port {self.port}")


class Services:
    """A Ray head (+ nodes joined to it) and, unless ``mlflow=False``, an MLflow server; for the session-shared
    instance, also the outputs tests share (the finished tiny job). Without a server, runs track to the store's
    default sqlite file."""

    def __init__(self, root: Path, *, head_cpus: int = 2, head_resources: dict[str, float] | None = None,
                 head_env: dict[str, str] | None = None, mlflow: bool = True):
        self.root = root
        self.cache: dict[str, object] = {}
        self.extra_nodes: list[RayNode] = []
        # Short temp dir: Ray's unix socket paths must stay under ~107 characters.
        self.ray_tmp = tempfile.mkdtemp(prefix="vr", dir="/tmp")
        self.mlflow = MlflowServer(str(root / "mlflow")) if mlflow else None
        self.head = None
        # This process talks to the cluster too (state API, JobSubmissionClient): token mode, the same token file.
        os.environ.pop(raytools.TOKEN_ENV, None)
        os.environ.update({raytools.MODE_ENV: "token", raytools.TOKEN_PATH_ENV: str(raytools.ensure_token_file())})
        raytools.use_cluster_token()
        try:
            self.head = RayNode(self.ray_tmp, num_cpus=head_cpus, resources=head_resources, env=head_env)
            if self.mlflow:
                wait_http(self.mlflow.url + "/health", 120, self.mlflow.proc, self.mlflow.log)
            wait_http(self.head.dashboard + "/api/version", 180, self.head.proc, self.head.log,
                      token=raytools.read_token())
        except BaseException:
            self.stop()
            raise

    def add_node(self, num_cpus: int = 1, resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None) -> RayNode:
        """Join a node to the head (returns at once; see ``alive_nodes``)."""
        node = RayNode(self.ray_tmp, head_address=self.head.address, num_cpus=num_cpus, resources=resources, env=env)
        self.extra_nodes.append(node)
        return node

    def alive_nodes(self) -> list:
        """The cluster's alive nodes (state API ``NodeState``s)."""
        from ray.util.state import list_nodes

        # Without raise_on_missing_output=False, a state filter raises once any node has died (total != returned).
        return list_nodes(address=self.head.dashboard, filters=[("state", "=", "ALIVE")], detail=True, timeout=10,
                          raise_on_missing_output=False)

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for CLI subprocesses: this cluster, this MLflow, no inherited secrets and no Ray auth
        settings: the CLI finds the token where a user's would (the vitpipe token file)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
        if self.mlflow:
            env["MLFLOW_TRACKING_URI"] = self.mlflow.url
        env.update({"RAY_API_SERVER_ADDRESS": self.head.dashboard, "RAY_ADDRESS": self.head.address,
                    "COLUMNS": "200", "PYTHONWARNINGS": "ignore::DeprecationWarning"})
        env.update(extra)
        return env

    def cli(self, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vitpipe.jobs.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env=self.env(**env), cwd=str(REPO))

    def stop(self) -> None:
        for n in self.extra_nodes:
            n.stop()
        if self.head:
            self.head.stop()
        if self.mlflow:
            self.mlflow.stop()
        subprocess.run(["rm", "-rf", self.ray_tmp], check=False)


def wait_for(pred, timeout: float, what: str, poll: float = 2.0):
    """``pred()``'s first truthy value, polled every ``poll`` seconds; AssertionError after ``timeout`` seconds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        got = pred()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def job_id_from(stdout: str) -> str:
    for word in stdout.split():
        if word.startswith("vitpipe-"):
            return word
    raise AssertionError(f"no job id in: {stdout}")


def mlflow_children(uri: str, parent_id: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def read_run(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / run_id / "run.json").read_text())


CIFAR10 = (REPO / ".." / "shared" / "data" / "cifar10").resolve()
# Client-side secret that must never reach the job, its logs, MLflow or stdout.
ENV_SECRET = "envsecret-" + "7f3a9c"


TINY_SETS = [f"data.root={CIFAR10}", f"fewshot.tasks=cifar10={CIFAR10},digits", f"finetune.task=cifar10={CIFAR10}",
             f"analysis.task=cifar10={CIFAR10}"]
"""The tests' dotted overrides of the tiny recipe: every stage, the downstream tasks on the real CIFAR-10 folders."""


def tiny_overrides(store: Path, *extra: str) -> list[str]:
    """``tiny --store STORE --set ...`` (TINY_SETS + ``extra``): the arguments of a CLI run or submit."""
    return ["tiny", "--store", str(store), *(a for e in (*TINY_SETS, *extra) for a in ("--set", e))]


def finished_tiny(svc: Services) -> dict:
    """Submit the tiny recipe once per session and wait for it; the outputs several tests read."""
    if "tiny" not in svc.cache:
        store = svc.root / "store"
        sub = svc.cli("submit", *tiny_overrides(store), AWS_SECRET_ACCESS_KEY=ENV_SECRET)
        assert sub.returncode == 0, sub.stdout + sub.stderr
        job = job_id_from(sub.stdout)
        st = svc.cli("status", job, "--wait", timeout=900)
        run_id = job.removeprefix("vitpipe-")
        svc.cache["tiny"] = {"job": job, "submit": sub, "status": st, "store": store, "run_id": run_id,
                             "record": read_run(store, run_id) if (store / "runs" / run_id).exists() else None}
    return svc.cache["tiny"]
