"""Run a pipeline: plan the stages, reuse cached ones, run the rest, track everything in one MLflow parent run."""

from __future__ import annotations

import datetime as _dt
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.graph import PlanItem, StageContext, plan
from vitpipe.jobs.store import StageResult, Store, remove
from vitpipe.jobs.tracking import MlflowTracker, NullTracker, default_tracking_uri, flatten, redact, redact_tree

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    status: str
    results: dict[str, StageResult] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    ui_hint: str = ""


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def plan_table(items: list[PlanItem], cfg: Any, title: str = "Stage plan") -> Table:
    table = Table(title=title)
    for col in ("stage", "status", "key", "inputs"):
        table.add_column(col)
    for it in items:
        style = {"cached": "green", "to run": "yellow", "forced": "magenta"}[it.status]
        table.add_row(it.stage.name, f"[{style}]{it.status}[/]", it.key, ", ".join(it.stage.inputs(cfg)))
    return table


def make_tracker(cfg: Any, run_id: str, tracking_uri: str | None, store: Store):
    if not cfg.tracking.enabled:
        return NullTracker()
    uri = tracking_uri or cfg.tracking.uri or default_tracking_uri(store.root)
    # a tracking server stores artifacts itself; only a local sqlite store gets an artifact root next to the store
    artifacts = cfg.tracking.artifact_location or (store.root + "/mlartifacts" if uri.startswith("sqlite:") else None)
    return MlflowTracker.start(uri, cfg.tracking.experiment, run_name=f"{cfg.name}-{run_id}",
                               tags={"vitpipe.run_id": run_id, "vitpipe.recipe": cfg.name},
                               artifact_location=artifacts)


def run_pipeline(cfg: Any, stages: list, *, force: tuple[str, ...] = (), dry_run: bool = False,
                 tracking_uri: str | None = None, console: Console | None = None, progress: bool = True,
                 run_id: str | None = None, parent_tracker: Any = None) -> RunSummary:
    """Run ``stages`` for ``cfg``; returns when every stage is done or one failed (then re-raises)."""
    console = console or Console()
    store = Store(cfg.store)
    items = plan(cfg, stages, store, force)
    console.print(plan_table(items, cfg))
    if dry_run:
        console.print_json(data=to_dict(cfg))
        return RunSummary(run_id="dry-run", status="DRY_RUN",
                          statuses={it.stage.name: it.status for it in items})

    run_id = run_id or new_run_id()
    tracker = parent_tracker or make_tracker(cfg, run_id, tracking_uri, store)
    # secrets never reach the store: credentials come from the environment, not from configs
    record = {"run_id": run_id, "recipe": cfg.name, "config": redact_tree(to_dict(cfg)), "status": "RUNNING",
              "tracking_uri": redact("uri", getattr(tracker, "uri", None)),
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "mlflow_run_id": tracker.run_id,
              "stages": {it.stage.name: {"key": it.key, "status": it.status} for it in items}}
    store.save_run(run_id, record)
    tracker.params(to_dict(cfg))
    if hasattr(tracker, "text"):
        import json
        tracker.text(json.dumps(to_dict(cfg), indent=2), "config.json")
    summary = RunSummary(run_id=run_id, status="RUNNING", mlflow_run_id=tracker.run_id,
                         ui_hint=getattr(tracker, "ui_hint", ""))
    results: dict[str, StageResult] = {}
    try:
        for it in items:
            name = it.stage.name
            child = tracker.child(name, tags={"vitpipe.stage": name, "vitpipe.key": it.key,
                                              "vitpipe.run_id": run_id})
            if not it.will_run:
                res = it.cached
                console.print(f"[green]✓ {name}[/]: cached (key {it.key}, produced by MLflow run "
                              f"{res.mlflow_run_id}, {res.seconds:.1f}s then)")
                child.tags({"cached": "true", "produced_by": str(res.mlflow_run_id)})
                child.metrics(res.metrics)
                child.finish()
                summary.statuses[name] = "cached"
            else:
                res = _run_stage(it, cfg, store, results, child, run_id, progress, console)
                summary.statuses[name] = "ran"
            results[name] = res
            record["stages"][name] = {"key": it.key, "status": summary.statuses[name],
                                      "seconds": round(res.seconds, 2), "mlflow_run_id": res.mlflow_run_id}
            store.save_run(run_id, record)
        summary.status = "FINISHED"
    except BaseException as e:
        summary.status = "FAILED"
        record["status"] = "FAILED"
        record["error"] = f"{type(e).__name__}: {e}"
        store.save_run(run_id, record)
        tracker.tags({"error": record["error"][:5000]})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    summary.results = results
    record["status"] = "FINISHED"
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    store.save_run(run_id, record)
    tracker.metrics({f"{s}/{k}": v for s, r in results.items() for k, v in r.metrics.items()
                     if isinstance(v, (int, float))})
    if "report" in results and hasattr(tracker, "text"):
        tracker.text(results["report"].info.get("markdown", ""), "report.md")  # the parent run shows the table
    tracker.finish()
    return summary


def _run_stage(it: PlanItem, cfg: Any, store: Store, results: dict[str, StageResult], child: Any, run_id: str,
               progress: bool, console: Console) -> StageResult:
    name = it.stage.name
    url = store.stage_url(name, it.key)
    if it.forced:
        remove(url)  # a forced stage starts from nothing, never from a half-trusted older output
    console.print(f"[yellow]▶ {name}[/] (key {it.key}) …")
    ctx = StageContext(cfg=cfg, key=it.key, url=url, store=store,
                       inputs={d: results[d] for d in it.stage.inputs(cfg)}, tracker=child, run_id=run_id,
                       progress=progress)
    child.params(flatten({name: to_dict(it.stage.config(cfg))}))
    t0 = time.perf_counter()
    try:
        res = it.stage.run(cfg, ctx)
    except BaseException:
        child.tags({"error": traceback.format_exc()[-5000:]})
        child.finish("FAILED")
        raise
    res.seconds = time.perf_counter() - t0
    res.mlflow_run_id = child.run_id
    store.save_result(res)  # written last: present means done
    child.metrics({k: v for k, v in res.metrics.items() if isinstance(v, (int, float))})
    child.metrics({"stage_seconds": res.seconds})
    child.finish()
    console.print(f"[green]✓ {name}[/] done in {res.seconds:.1f}s")
    return res
