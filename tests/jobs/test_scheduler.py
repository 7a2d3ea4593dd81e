"""The stage scheduler (``vitpipe.jobs.run.scheduler``): plan order when sequential, independent branches at once
when concurrent, one failing branch -> run FAILED with no stage left RUNNING."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

import pytest

from vitpipe.jobs.core.store import StageResult, Store
from vitpipe.jobs.run.scheduler import CONCURRENCY_ENV, Node, default_concurrency, execute


def _nodes(background=True):
    """a -> (b, c) -> d: b and c depend only on a, like fewshot and finetune on pretrain."""
    return [Node("a", (), "a"), Node("b", ("a",), "b", background), Node("c", ("a",), "c", background),
            Node("d", ("b", "c"), "d")]


def test_sequential_is_the_plain_loop_in_plan_order():
    calls, recorded = [], []
    execute(_nodes(), lambda n: calls.append(n.name) or n.name.upper(), lambda n, r: recorded.append(r))
    assert calls == ["a", "b", "c", "d"] and recorded == ["A", "B", "C", "D"]

    calls.clear()

    def boom(n):
        calls.append(n.name)
        if n.name == "b":
            raise RuntimeError("b broke")
        return n.name

    with pytest.raises(RuntimeError, match="b broke"):
        execute(_nodes(), boom, lambda n, r: None)
    assert calls == ["a", "b"]  # the first failure stops a sequential run, as before


def test_concurrent_branches_overlap_and_join_before_their_dependent():
    c_started, events, main = threading.Event(), [], threading.get_ident()
    lock = threading.Lock()

    def run(n):
        with lock:
            events.append(f"start {n.name}")
        if n.name == "b":  # returns only if c runs at the same time (bounded, so a sequential bug fails, not hangs)
            assert c_started.wait(20), "b and c did not run at the same time"
        if n.name == "c":
            c_started.set()
        with lock:
            events.append(f"end {n.name}")
        return n.name

    recorded_on = []
    execute(_nodes(), run, lambda n, r: recorded_on.append((r, threading.get_ident() == main)), concurrency=4)
    assert events[:2] == ["start a", "end a"] and events[-2:] == ["start d", "end d"]
    assert set(events[2:6]) == {"start b", "start c", "end b", "end c"}
    assert [r for r, _ in recorded_on][0] == "a" and [r for r, _ in recorded_on][-1] == "d"
    assert all(on_main for _, on_main in recorded_on)  # bookkeeping never leaves the calling thread


def test_concurrent_failure_waits_for_the_other_branch_and_skips_dependents():
    release, ran, recorded = threading.Event(), [], []

    def run(n):
        ran.append(n.name)
        if n.name == "b":
            release.set()
            raise RuntimeError("b broke")
        if n.name == "c":
            assert release.wait(20)
        return n.name

    with pytest.raises(RuntimeError, match="b broke"):
        execute(_nodes(), run, lambda n, r: recorded.append(r), concurrency=4)
    assert sorted(ran) == ["a", "b", "c"] and "d" not in ran
    assert recorded == ["a", "c"]  # the branch still running when b failed finished and was recorded


def test_concurrency_setting(monkeypatch):
    for var in (CONCURRENCY_ENV, "RAY_ADDRESS", "RAY_JOB_SUBMISSION_ID"):
        monkeypatch.delenv(var, raising=False)
    assert default_concurrency() == 1  # a laptop / CI machine: sequential
    monkeypatch.setenv("RAY_JOB_SUBMISSION_ID", "raysubmit_1")
    assert default_concurrency() > 1  # inside a Ray job: every ready stage at once
    monkeypatch.setenv(CONCURRENCY_ENV, "1")
    assert default_concurrency() == 1
    monkeypatch.setenv(CONCURRENCY_ENV, "two")
    with pytest.raises(ValueError, match=CONCURRENCY_ENV):
        default_concurrency()


# ------------------------------------------------------------------------- through the runner, on Ray + MLflow
@dataclass(kw_only=True)
class ToyCfg:
    store: str = ""
    name: str = "toy"
    stages: tuple = ("pre", "left", "right", "final")
    tracking: object = field(default=None)


class ToyStage:
    version = "1"

    def __init__(self, name, deps, resources=None, fail=False):
        self.name, self.deps, self._resources, self.fail = name, deps, resources, fail

    def inputs(self, cfg):
        return self.deps

    def reads(self, cfg):
        return {}

    def resources(self, cfg):
        return None  # on the driver

    def run(self, cfg, ctx):
        import os

        ctx.tracker.metrics({"pid": os.getpid()})
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        return StageResult(stage=self.name, key=ctx.key, metrics={"pid": os.getpid()})


class RemoteToy(ToyStage):
    def resources(self, cfg):
        return self._resources


@pytest.mark.integration
def test_runner_runs_branches_as_ray_tasks_and_a_failed_branch_fails_the_run(tmp_path, ray_local, mlflow_uri):
    import os

    import ray.cloudpickle
    from mlflow.tracking import MlflowClient

    from vitpipe.jobs.run.runner import run_pipeline
    from vitpipe.jobs.core.tracking import MlflowTracker

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # toy stages travel to the workers by value
    cfg = ToyCfg(store=str(tmp_path))
    stages = [ToyStage("pre", []), RemoteToy("left", ["pre"], {"CPU": 1}),
              RemoteToy("right", ["pre"], {"CPU": 1}, fail=True), ToyStage("final", ["left", "right"])]
    parent = MlflowTracker.start(mlflow_uri, "toy", run_name="toy")
    with pytest.raises(RuntimeError, match="right broke"):
        run_pipeline(cfg, stages, parent_tracker=parent, progress=False, stage_concurrency=2, run_id="toy-1")

    record = Store(str(tmp_path)).load_run("toy-1")
    assert record["status"] == "FAILED" and "right broke" in record["error"]
    assert record["stages"]["left"]["status"] == "ran" and record["stages"]["final"]["status"] == "to run"
    client = MlflowClient(mlflow_uri)
    assert client.get_run(parent.run_id).info.status == "FAILED"
    kids = {r.data.tags["vitpipe.stage"]: r for r in client.search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")}
    assert {k: r.info.status for k, r in kids.items()} == {"pre": "FINISHED", "left": "FINISHED", "right": "FAILED"}
    # the branches ran in Ray workers, not in this process, and logged into their own stage runs
    assert kids["left"].data.metrics["pid"] != os.getpid() and kids["right"].data.metrics["pid"] != os.getpid()
    assert kids["pre"].data.metrics["pid"] == os.getpid()
    # the branch that finished is cached for a resume
    assert Store(str(tmp_path)).load_result("left", record["stages"]["left"]["key"]) is not None
