"""The stage graph: which stages a run has, their cache keys, and the plan (cached / to run).

A stage's key = hash(stage name, stage version, the config the stage reads, the keys of its inputs). The output of a
finished key is reused by any later run; forcing a stage reruns it and everything downstream of it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from vitpipe.jobs.configtools import ConfigError, config_hash
from vitpipe.jobs.store import StageResult, Store

log = logging.getLogger(__name__)


@dataclass
class StageContext:
    """Everything a running stage may use: where to write, what its inputs produced, how to report."""

    cfg: Any  # PipelineConfig
    key: str
    url: str  # this stage's output folder (fsspec URL)
    store: Store
    inputs: dict[str, StageResult]
    tracker: Any  # Tracker
    run_id: str
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    version: str  # bump when the stage's code changes what it writes

    def inputs(self, cfg: Any) -> list[str]: ...
    def config(self, cfg: Any) -> Any: ...  # the part of the pipeline config this stage's output depends on
    def run(self, cfg: Any, ctx: StageContext) -> StageResult: ...


@dataclass
class PlanItem:
    stage: Stage
    key: str
    cached: StageResult | None
    forced: bool = False

    @property
    def will_run(self) -> bool:
        return self.cached is None or self.forced

    @property
    def status(self) -> str:
        if self.forced:
            return "forced"
        return "cached" if self.cached else "to run"


def stage_key(stage: Stage, cfg: Any, input_keys: list[str]) -> str:
    return config_hash({"stage": stage.name, "version": stage.version, "config": stage.config(cfg),
                        "inputs": input_keys})


def plan(cfg: Any, stages: list[Stage], store: Store, force: tuple[str, ...] = ()) -> list[PlanItem]:
    """Topologically ordered plan; a forced stage forces its dependents too (their inputs are being remade)."""
    by_name = {s.name: s for s in stages}
    unknown = [f for f in force if f not in by_name]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' (stages: {', '.join(by_name)})")
    order = _toposort(cfg, stages)
    keys: dict[str, str] = {}
    forced: set[str] = set(force)
    items = []
    for stage in order:
        deps = stage.inputs(cfg)
        keys[stage.name] = stage_key(stage, cfg, [keys[d] for d in deps])
        is_forced = stage.name in forced or any(d in forced for d in deps)
        if is_forced:
            forced.add(stage.name)
        items.append(PlanItem(stage, keys[stage.name], store.load_result(stage.name, keys[stage.name]), is_forced))
    return items


def _toposort(cfg: Any, stages: list[Stage]) -> list[Stage]:
    by_name = {s.name: s for s in stages}
    done: dict[str, Stage] = {}
    visiting: set[str] = set()

    def visit(s: Stage) -> None:
        if s.name in done:
            return
        if s.name in visiting:
            raise ValueError(f"stage graph has a cycle through '{s.name}'")
        visiting.add(s.name)
        for d in s.inputs(cfg):
            if d not in by_name:
                raise ValueError(f"stage '{s.name}' needs unknown stage '{d}'")
            visit(by_name[d])
        visiting.discard(s.name)
        done[s.name] = s

    for s in stages:
        visit(s)
    return list(done.values())
