"""The stage graph of a run: topological order, each stage's cache key, and the plan (cached / to run / forced).

A finished key's output is reused by any later run; forcing a stage reruns it and everything downstream of it. The
key rule itself lives with the stages (``vitpipe.jobs.stages.base.stage_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vitpipe.jobs.core.configtools import ConfigError
from vitpipe.jobs.core.store import StageResult, Store
from vitpipe.jobs.stages.base import Stage, stage_key

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig


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


def plan(cfg: PipelineConfig, stages: list[Stage], store: Store, force: tuple[str, ...] = ()) -> list[PlanItem]:
    """Topologically ordered plan; a forced stage forces its dependents too (their inputs are being remade)."""
    by_name = {s.name: s for s in stages}
    unknown = [f for f in force if f not in by_name]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' (stages: {', '.join(by_name)})")
    keys: dict[str, str] = {}
    forced: set[str] = set(force)
    items = []
    for stage in toposort(cfg, stages):
        deps = stage.inputs(cfg)
        keys[stage.name] = stage_key(stage, cfg, [keys[d] for d in deps])
        is_forced = stage.name in forced or any(d in forced for d in deps)
        if is_forced:
            forced.add(stage.name)
        items.append(PlanItem(stage, keys[stage.name], store.load_result(stage.name, keys[stage.name]), is_forced))
    return items


def toposort(cfg: PipelineConfig, stages: list[Stage]) -> list[Stage]:
    """``stages`` ordered so that every stage comes after its inputs (ValueError on a cycle or unknown input)."""
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
