"""A Ray head vitpipe starts is closed to the network (raytools' docstring is the claim):

(a) every listening socket of the Ray processes it started (found by process tree, not by name) is on loopback;
(b) on 127.0.0.1, a client without the token (or with a wrong one) is refused by the GCS, the raylet, a worker,
    the dashboard agent (gRPC and ``POST /api/job_agent/jobs/``), the job server and the runtime-env agent, and
    one with the token gets through;
(c) ``vitpipe`` commands against it say in one line that a token is missing or wrong, and work with the token file.

Checked on both heads vitpipe starts: ``ray.init`` in ``vitpipe run`` (the ``ray_local`` fixture is exactly that)
and ``ray start --head`` with a node joined to it (tests/support/cluster_services.py, as the cluster tests use),
which a second driver on this machine joins by its GCS address.
All traffic goes to 127.0.0.1. Turning token auth off (``RAY_AUTH_MODE=disabled``) fails (b) and (c); dropping
single-machine mode (the loopback binding) fails (a).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cluster_services as svcmod
import grpc
import psutil
import pytest

from vitpipe.jobs.core import raytools

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
WRONG = "0" * 64  # a well-formed token that is not the cluster's
REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------- helpers
def listeners(roots: list[int]) -> dict[tuple[str, int], str]:
    """(ip, port) -> process name of every TCP listener of ``roots`` and all their descendants."""
    procs: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    found = {}
    for p in procs.values():
        try:
            conns = p.net_connections("inet")
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status == psutil.CONN_LISTEN:
                found[(c.laddr.ip, c.laddr.port)] = name
    return found


def grpc_code(address: str, stub: type, method: str, request, token: str | None) -> str:
    """Status of one unary call over a plain channel (no Ray interceptors): ``OK`` or the error code's name."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        try:
            getattr(stub(channel), method)(request, metadata=metadata, timeout=15)
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def http_status(method: str, url: str, token: str | None, body: dict | None = None) -> int:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    data = json.dumps(body).encode() if body is not None else None
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers, method=method),
                                    timeout=15) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# --------------------------------------------------------------------------------------------------- ray.init head
@pytest.fixture(scope="module")
def head(ray_local):
    """The session's ``vitpipe run`` head, with an actor whose worker has its own gRPC port."""
    ray = ray_local
    node = ray._private.worker._global_node
    assert node is not None and node.head and node.all_processes, "ray_local must start its own head (RAY_ADDRESS?)"

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self) -> int:
            return os.getpid()

    actor = Probe.remote()
    actor_pid = ray.get(actor.pid.remote())
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos]
    yield {"node": node, "roots": roots, "actor_pid": actor_pid, "token": raytools.read_token(),
           "token_source": raytools.find_token(), "dashboard": f"http://{node.address_info['webui_url']}"}
    ray.kill(actor)


def test_every_socket_of_a_vitpipe_head_is_on_loopback(head):
    node = head["node"]
    found = listeners(head["roots"])
    ports = {port for _, port in found}
    # The check covers the servers that matter (a vacuous pass on an empty tree is not possible).
    expected = {int(node.gcs_address.rsplit(":", 1)[1]), node.node_manager_port, node.metrics_agent_port,
                node.dashboard_agent_listen_port, node.runtime_env_agent_port,
                int(head["dashboard"].rsplit(":", 1)[1])}
    assert expected <= ports, (expected - ports, found)
    actor_ports = [c.laddr.port for c in psutil.Process(head["actor_pid"]).net_connections("inet")
                   if c.status == psutil.CONN_LISTEN]
    assert actor_ports and set(actor_ports) <= ports  # the worker is in the tree, its port too
    assert {addr: name for addr, name in found.items() if addr[0] not in LOOPBACK} == {}


def test_a_client_without_the_token_is_refused_by_every_ray_server(head):
    from ray.core.generated import core_worker_pb2, core_worker_pb2_grpc, gcs_service_pb2, gcs_service_pb2_grpc
    from ray.core.generated import node_manager_pb2, node_manager_pb2_grpc, reporter_pb2, reporter_pb2_grpc

    node, token = head["node"], head["token"]
    assert token and len(token) == 64
    worker_port = [c.laddr.port for c in psutil.Process(head["actor_pid"]).net_connections("inet")
                   if c.status == psutil.CONN_LISTEN][0]
    calls = {
        "GCS": (node.gcs_address, gcs_service_pb2_grpc.NodeInfoGcsServiceStub, "GetAllNodeInfo",
                gcs_service_pb2.GetAllNodeInfoRequest()),
        "GCS KV": (node.gcs_address, gcs_service_pb2_grpc.InternalKVGcsServiceStub, "InternalKVKeys",
                   gcs_service_pb2.InternalKVKeysRequest(prefix=b"")),
        "raylet": (f"127.0.0.1:{node.node_manager_port}", node_manager_pb2_grpc.NodeManagerServiceStub,
                   "GetNodeStats", node_manager_pb2.GetNodeStatsRequest()),
        "worker": (f"127.0.0.1:{worker_port}", core_worker_pb2_grpc.CoreWorkerServiceStub, "NumPendingTasks",
                   core_worker_pb2.NumPendingTasksRequest()),
        "dashboard agent gRPC": (f"127.0.0.1:{node.metrics_agent_port}", reporter_pb2_grpc.ReporterServiceStub,
                                 "HealthCheck", reporter_pb2.HealthCheckRequest()),
    }
    got = {what: [grpc_code(*call, token=t) for t in (None, WRONG, token)] for what, call in calls.items()}
    assert got == {what: ["UNAUTHENTICATED", "UNAUTHENTICATED", "OK"] for what in calls}

    jobs = f"{head['dashboard']}/api/jobs/"
    agent = f"http://127.0.0.1:{node.dashboard_agent_listen_port}/api/job_agent/jobs/"
    runtime_env = f"http://127.0.0.1:{node.runtime_env_agent_port}/get_or_create_runtime_env"
    submit = {"entrypoint": "echo never-runs"}
    assert [http_status("GET", jobs, t) for t in (None, WRONG, token)] == [401, 403, 200]
    assert [http_status("POST", jobs, t, submit) for t in (None, WRONG)] == [401, 403]
    assert [http_status("POST", agent, t, submit) for t in (None, WRONG)] == [401, 403]
    assert [http_status("POST", runtime_env, t, {}) for t in (None, WRONG)] == [401, 403]
    # With the token the agents get to the request itself (an empty body is then a client/server error, not 401/403).
    assert http_status("POST", agent, token, {}) not in (401, 403)
    assert http_status("POST", runtime_env, token, {}) not in (401, 403)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vitpipe.jobs.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=str(REPO))


def test_cli_without_or_with_a_wrong_token_says_so_in_one_line(head, tmp_path):
    # No token anywhere: not in the environment, no vitpipe token file, no ~/.ray/auth_token.
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "XDG_"))}
    base.update({"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "config"), "COLUMNS": "200"})
    address = ["--address", head["dashboard"]]
    _, path = head["token_source"]
    # The head's token: found by the CLI in the vitpipe token file (the usual case), else named explicitly.
    right = ({"XDG_CONFIG_HOME": str(path.parents[1])} if path == raytools.token_path()
             else {"RAY_AUTH_TOKEN_PATH": str(path)} if path else {"RAY_AUTH_TOKEN": head["token"]})
    cases = {"none": ({}, 2, "requires a token (token auth is on there): set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH"),
             "wrong": ({"RAY_AUTH_TOKEN": WRONG}, 2, "refused the token from RAY_AUTH_TOKEN"),
             "right": (right, 0, None)}
    for name, (extra, code, message) in cases.items():
        res = _cli("jobs", *address, env={**base, **extra})
        out = (res.stdout + res.stderr).strip()
        assert res.returncode == code, (name, out)
        assert head["token"] not in out
        if message:
            lines = [ln for ln in res.stdout.strip().splitlines() if ln.strip()]
            assert lines[-1].startswith("error:") and message in lines[-1], (name, out)
            assert "Traceback" not in out, (name, out)


# --------------------------------------------------------------------------------------------------- ray start head
def test_ray_start_head_and_a_joined_node_listen_on_loopback_only(tmp_path):
    svc = svcmod.Services(tmp_path, head_cpus=1, mlflow=False)
    try:
        svc.add_node(num_cpus=1)
        svcmod.wait_for(lambda: len(svc.alive_nodes()) == 2, 120, "the joined node", poll=1.0)
        found = listeners([svc.head.proc.pid, *(n.proc.pid for n in svc.extra_nodes)])
        names = set(found.values())
        assert {"gcs_server", "raylet"} <= names and sum(name == "raylet" for name in found.values()) >= 4, found
        assert svc.head.gcs_port in {port for _, port in found} and svc.head.dashboard_port in {p for _, p in found}
        assert {addr: name for addr, name in found.items() if addr[0] not in LOOPBACK} == {}
        token = raytools.read_token()
        assert [http_status("GET", f"{svc.head.dashboard}/api/jobs/", t) for t in (None, WRONG, token)] == [
            401, 403, 200]
        # A driver on this machine joins by the GCS address, as `vitpipe rerun/resume` do (RAY_ADDRESS): with the
        # token from the vitpipe file, over loopback (Ray would dial the outward IP, where nothing listens).
        code = ("import ray; from vitpipe.jobs.core.raytools import ensure_ray; ensure_ray(); "
                "print('driver', ray.util.get_node_ip_address(), int(ray.cluster_resources()['CPU']))")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env=svc.env(), cwd=str(REPO))
        assert res.returncode == 0 and "driver 127.0.0.1 2" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
    finally:
        svc.stop()
