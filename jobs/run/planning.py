"""The stage plan as people see it: each stage's status (cached / stale / to run / forced) and the one table that
draws it (``vitpipe run``, ``--dry-run``, ``vitpipe plan``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from vitpipe.jobs.core.store import Store
from vitpipe.jobs.run.graph import PlanItem, plan
from vitpipe.jobs.stages import stages_for

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

STATUS_STYLE = {"cached": "green", "to run": "yellow", "forced": "magenta", "stale": "red"}


def plan_table(items: list[tuple[PlanItem, str]], cfg: PipelineConfig, title: str = "Stage plan") -> Table:
    """Rows of (stage, status, key, inputs)."""
    table = Table(title=title)
    for col in ("stage", "status", "key", "inputs"):
        table.add_column(col)
    for it, status in items:
        table.add_row(it.stage.name, f"[{STATUS_STYLE[status]}]{status}[/]", it.key, ", ".join(it.stage.inputs(cfg)))
    return table


def stage_plan(cfg: PipelineConfig, force: tuple[str, ...] = ()) -> list[tuple[PlanItem, str]]:
    """The stage graph as (PlanItem, status) with status cached / stale / to run / forced.

    ``stale``: not cached for this config, but an earlier run in the store produced the stage under another key
    (its output is out of date for this config and will be replaced by a new one).
    """
    store = Store(cfg.store)
    items = plan(cfg, stages_for(cfg), store, force)
    seen: dict[str, set[str]] = {}
    for record in store.list_runs():
        for name, st in record.get("stages", {}).items():
            seen.setdefault(name, set()).add(st.get("key", ""))
    out = []
    for it in items:
        status = it.status
        if status == "to run" and seen.get(it.stage.name, set()) - {it.key}:
            status = "stale"
        out.append((it, status))
    return out
