"""Multi-node on one machine (issue #7): a 1-CPU head plus 1-CPU nodes joined with `ray start --address`, the tiny
pipeline submitted with its two pretraining workers STRICT_SPREAD over two nodes, every output in a store both reach.
Its stages with workers on several nodes run (ingest, pretrain, finetune); those that run in the driver alone
(dedup, fewshot, analysis, report) are left out for time (test_cluster_integration runs them on a cluster).

Each node's TMPDIR is a scratch folder of its own, wiped when the node is lost (a dead machine's disk goes with it), so
a checkpoint or output left only in a node's scratch would break the resume below. The worker node is lost twice:

1. a replacement node joins: Ray Train restarts the worker group (head + replacement) from the step-4 checkpoint;
2. no replacement: the restart cannot be placed; `vitpipe status --wait` diagnoses the waiting workers, and the job
   fails within pretrain.placement_timeout_s naming `vitpipe resume RUN` (never a hang). Once a new node joins, that
   resume finishes the run from the step-8 checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cluster_services as svcmod
import pytest
from needs import need_dir

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS, EVERY = 12, 4
HOLDS = (4, 8)  # the workers pause after these checkpoints so the test can take their node away
ATTEMPT_S, PLACEMENT_S = 5, 20  # Ray Train placement attempts of 5 s, the stage gives up after 20 s of them
PENDING_S = 8  # `vitpipe status --pending-timeout`: longer than one attempt, as its 120 s default is than Ray's 60 s


class Cluster:
    """A Services head of 1 CPU and the nodes the test joins, each with its own TMPDIR and a ``node_<name>``
    resource (how the test finds its Ray node id)."""

    def __init__(self, root: Path):
        self.root = root
        self.scratch: dict[str, Path] = {}
        # The head's GCS checks its nodes every second (default 3 s): a lost node is declared dead within ~5 s.
        self.svc = svcmod.Services(root, head_cpus=1, head_resources={"node_head": 1}, mlflow=False, head_env={
            "TMPDIR": str(self._scratch("head")), "RAY_health_check_period_ms": "1000"})
        self.nodes: dict[str, object] = {}

    def _scratch(self, name: str) -> Path:
        path = self.root / f"scratch-{name}"
        path.mkdir()
        self.scratch[name] = path
        return path

    def node_id(self, name: str, timeout: float = 30) -> str:
        """Ray node id of node ``name``, once it is alive."""
        ids = svcmod.wait_for(lambda: [n.node_id for n in self.svc.alive_nodes()
                                       if f"node_{name}" in (n.resources_total or {})], timeout,
                              f"node {name} to be alive", poll=1.0)
        return ids[0]

    def join(self, name: str) -> str:
        """Start node ``name`` (1 CPU) and return its Ray node id once it is alive."""
        self.nodes[name] = self.svc.add_node(1, {f"node_{name}": 1}, env={"TMPDIR": str(self._scratch(name))})
        return self.node_id(name, timeout=120)

    def lose(self, name: str) -> None:
        """SIGKILL node ``name``'s processes and wipe its scratch folder."""
        self.nodes[name].kill()
        shutil.rmtree(self.scratch[name])

    def train_worker_nodes(self, alive: bool = True) -> list[str]:
        """Node ids of the Ray Train workers (``alive``: those alive now, else every one the cluster has seen)."""
        from ray.util.state import list_actors

        filters = [("class_name", "=", "RayTrainWorker")] + ([("state", "=", "ALIVE")] if alive else [])
        actors = list_actors(address=self.svc.head.dashboard, filters=filters, detail=True, limit=1000, timeout=10)
        return sorted(a.node_id for a in actors)


@pytest.fixture
def cluster(tmp_path):
    need_dir(svcmod.CIFAR10 / "train", "CIFAR-10 JPEG folders")
    c = Cluster(tmp_path)
    try:
        yield c
    finally:
        c.svc.stop()  # every node the test started, by process group and tree; never `ray stop`


def _latest_checkpoint(ray_dir: Path) -> str:
    """The newest checkpoint Ray Train has registered (its snapshot), e.g. ``step_00000004`` ("" before the first);
    after a resume the names carry a suffix (``step_00000008-1a2b3c``)."""
    try:
        snap = json.loads((ray_dir / "checkpoint_manager_snapshot.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return ""
    return (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name") or ""


def _steps(path: Path) -> list[int]:
    return sorted({json.loads(ln)["step"] for ln in path.read_text().splitlines() if ln.strip()})


def test_spread_pretraining_survives_losing_its_node(cluster):
    svc = cluster.svc
    head, b = cluster.node_id("head"), cluster.join("b")
    store = cluster.root / "store"
    debug = {"record_keys": True, "hold_after_steps": list(HOLDS), "hold_s": 120}
    overrides = ["stages=ingest,pretrain,finetune", "pretrain.num_workers=2", "pretrain.cpus_per_worker=1",
                 "pretrain.placement_strategy=STRICT_SPREAD", f"pretrain.steps={STEPS}",
                 f"pretrain.checkpoint_every={EVERY}", "pretrain.max_failures=2",
                 f"pretrain.placement_timeout_s={PLACEMENT_S}"]
    sub = svc.cli("submit", *svcmod.tiny_overrides(store, *overrides), "--env", "VITPIPE_TEST_HOOKS",
                  "--env", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", VITPIPE_TEST_HOOKS=json.dumps(debug),
                  RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S=str(ATTEMPT_S))
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job = svcmod.job_id_from(sub.stdout)
    run_id = job.removeprefix("vitpipe-")
    svcmod.wait_for(lambda: (store / "runs" / run_id / "run.json").exists(), 300, "the run record")
    stage = store / "stages" / "pretrain" / svcmod.read_run(store, run_id)["stages"]["pretrain"]["key"]
    ray_dir = stage / "ray"

    # 1. Spread over head + b; b is lost after the step-4 checkpoint and a replacement c joins.
    svcmod.wait_for(lambda: _latest_checkpoint(ray_dir).startswith("step_00000004"), 300, "the step-4 checkpoint",
                    poll=0.5)
    assert cluster.train_worker_nodes() == sorted([head, b])
    cluster.lose("b")
    c = cluster.join("c")
    svcmod.wait_for(lambda: _latest_checkpoint(ray_dir).startswith("step_00000008"), 300, "the step-8 checkpoint",
                    poll=0.5)
    assert cluster.train_worker_nodes() == sorted([head, c])  # restarted by Ray Train on the replacement

    # 2. c is lost and nothing replaces it: diagnosed while the restart waits, then a bounded failure.
    cluster.lose("c")
    st = svc.cli("status", job, "--wait", "--pending-timeout", str(PENDING_S), timeout=300)
    assert st.returncode == 1, st.stdout + st.stderr
    assert f"job {job}: RUNNING" in st.stdout, st.stdout
    assert "diagnosis: training workers wait for 2 worker bundles" in st.stdout, st.stdout
    st = svc.cli("status", job, "--wait", timeout=300)
    assert st.returncode == 1, st.stdout + st.stderr
    assert f"job {job}: FAILED" in st.stdout, st.stdout
    reason = next(ln for ln in st.stdout.splitlines() if "reason:" in ln)
    assert "could not be placed" in reason and "1 alive node(s)" in reason, reason
    assert f"vitpipe resume {run_id} --store {store}" in reason, reason
    assert f"resume with: vitpipe resume {run_id} --store {store}" in st.stdout

    # 3. With a new node, the resume command finishes the run from the step-8 checkpoint.
    d = cluster.join("d")
    res = svc.cli("resume", run_id, "--store", str(store), timeout=600,
                  VITPIPE_TEST_HOOKS=json.dumps({"record_keys": True}))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rec = svcmod.read_run(store, run_id)
    assert rec["status"] == "FINISHED"
    for name, st_ in rec["stages"].items():
        assert (store / "stages" / name / st_["key"] / "result.json").is_file(), name
    assert (stage / "model.pt").is_file() and (stage / "model.json").is_file()
    assert (store / "stages" / "finetune" / rec["stages"]["finetune"]["key"] / "finetune.json").is_file()

    # Ray Train restarted from step 4, `vitpipe resume` from step 8; between them, each rank trained every step.
    assert _steps(stage / "debug" / "keys-rankresume.jsonl") == [4, 8]
    for rank in (0, 1):
        assert _steps(stage / "debug" / f"keys-rank{rank}.jsonl") == list(range(1, STEPS + 1))
    # Both ranks' ZeRO shards of the last checkpoint are in the shared store, one written by the worker on d.
    latest = ray_dir / _latest_checkpoint(ray_dir)
    assert latest.name.startswith(f"step_{STEPS:08d}")
    assert {p.name for p in latest.rglob("zero_pp_rank_*_optim_states.pt")} == {
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert d in cluster.train_worker_nodes(alive=False)
