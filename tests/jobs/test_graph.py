from dataclasses import dataclass, field

import pytest

from vitpipe.jobs.core.configtools import ConfigError, apply_overrides
from vitpipe.jobs.run.graph import plan
from vitpipe.jobs.run.runner import run_pipeline
from vitpipe.jobs.core.store import StageResult, Store
from vitpipe.jobs.core.tracking import NullTracker


@dataclass(kw_only=True)
class Cfg:
    a: int = 1
    b: int = 2
    store: str = ""
    name: str = "toy"
    stages: tuple = ("first", "second")
    tracking: object = field(default=None)


class Toy:
    def __init__(self, name, deps, section, calls):
        self.name, self.version, self.deps, self.section, self.calls = name, "1", deps, section, calls

    def inputs(self, cfg):
        return self.deps

    def resources(self, cfg):
        return None

    def reads(self, cfg):
        return {self.section: getattr(cfg, self.section)}

    def run(self, cfg, ctx):
        self.calls.append(self.name)
        total = getattr(cfg, self.section) + sum(r.metrics["value"] for r in ctx.inputs.values())
        return StageResult(stage=self.name, key=ctx.key, metrics={"value": total})


def stages(calls):
    return [Toy("second", ["first"], "b", calls), Toy("first", [], "a", calls)]


def test_cache_rerun_and_force(tmp_path):
    cfg = Cfg(store=str(tmp_path))
    calls = []
    s = run_pipeline(cfg, stages(calls), parent_tracker=NullTracker())
    assert calls == ["first", "second"] and s.results["second"].metrics["value"] == 3
    calls.clear()
    s = run_pipeline(cfg, stages(calls), parent_tracker=NullTracker())
    assert calls == [] and s.statuses == {"first": "cached", "second": "cached"}
    # changing the downstream config reruns only downstream
    s = run_pipeline(apply_overrides(cfg, ["b=5"]), stages(calls), parent_tracker=NullTracker())
    assert calls == ["second"] and s.results["second"].metrics["value"] == 6
    calls.clear()
    # forcing upstream reruns it and everything depending on it
    run_pipeline(cfg, stages(calls), force=("first",), parent_tracker=NullTracker())
    assert calls == ["first", "second"]
    with pytest.raises(ConfigError, match="unknown stage 'third'"):
        plan(cfg, stages([]), Store(str(tmp_path)), force=("third",))


def test_failed_stage_leaves_no_result(tmp_path):
    cfg = Cfg(store=str(tmp_path))

    class Boom(Toy):
        def run(self, cfg, ctx):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(cfg, [Toy("first", [], "a", []), Boom("second", ["first"], "b", [])],
                     parent_tracker=NullTracker())
    items = plan(cfg, stages([]), Store(str(tmp_path)))
    assert [i.status for i in items] == ["cached", "to run"]
    runs = Store(str(tmp_path)).list_runs()
    assert runs[-1]["status"] == "FAILED" and "boom" in runs[-1]["error"]
