"""Run a pipeline: plan the stages, reuse cached ones, run the rest, track everything in one MLflow parent run.

``run_pipeline`` runs a config as a new run (or as another attempt of ``run_id``); ``execute`` is the entry of the
run-level verbs that continue an existing run (``vitpipe resume``/``rerun`` and a submitted job's ``driver``): it
re-attaches to the run's MLflow parent and turns SIGTERM into a clean FAILED/KILLED ending.
"""

from __future__ import annotations

import datetime as _dt
import logging
import signal
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.console import Console

from vitpipe.jobs.config.resolved import ResolvedConfig
from vitpipe.jobs.core.configtools import ConfigError, to_dict
from vitpipe.jobs.core.metric_names import STAGE_SECONDS, parent_metrics
from vitpipe.jobs.core.store import StageResult, Store, exists, remove
from vitpipe.jobs.run.graph import PlanItem, plan
from vitpipe.jobs.run.planning import plan_table
from vitpipe.jobs.run.scheduler import run_stages
from vitpipe.jobs.run.view import RunView, run_log_path
from vitpipe.jobs.stages import stages_for
from vitpipe.jobs.stages.base import Stage, StageContext
from vitpipe.jobs.train.progress import NULL_PROGRESS
from vitpipe.jobs.core.secrets import flatten, redact, redact_text, redact_tree
from vitpipe.jobs.core.tracking import (MlflowTracker, NullTracker, Tracker, default_tracking_uri,
                                        recorded_tracking_uri)

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

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


def tracking_uri_for(cfg: PipelineConfig, override: str | None) -> str:
    """``override`` (``--tracking-uri``), else the config's, else ``$MLFLOW_TRACKING_URI`` or a sqlite file in the store."""
    return override or cfg.tracking.uri or default_tracking_uri(Store(cfg.store).root)


def make_tracker(cfg: PipelineConfig, run_id: str, tracking_uri: str | None, store: Store) -> Tracker:
    if not cfg.tracking.enabled:
        return NullTracker()
    uri = tracking_uri_for(cfg, tracking_uri)
    # a tracking server stores artifacts itself; only a local sqlite store gets an artifact root next to the store
    artifacts = cfg.tracking.artifact_location or (store.root + "/mlartifacts" if uri.startswith("sqlite:") else None)
    return MlflowTracker.start(uri, cfg.tracking.experiment, run_name=f"{cfg.name}-{run_id}",
                               tags={"vitpipe.run_id": run_id, "vitpipe.recipe": cfg.name},
                               artifact_location=artifacts)


def run_pipeline(cfg: PipelineConfig | ResolvedConfig, stages: list[Stage], *, force: tuple[str, ...] = (),
                 dry_run: bool = False, tracking_uri: str | None = None, console: Console | None = None,
                 progress: bool = True, run_id: str | None = None, parent_tracker: Tracker | None = None,
                 stage_concurrency: int | None = None, view: RunView | None = None) -> RunSummary:
    """Run ``stages`` for ``cfg``; returns when every stage is done or one failed (then re-raises).

    ``stage_concurrency``: stages that may run at once (``jobs.run.scheduler``; None: its default, sequential
    unless inside a Ray job). ``view``: what the run shows and where its log goes (``jobs.run.view``; the caller
    closes it); None: a view on ``console`` (default stdout), closed when the run ends."""
    if view is None:
        with RunView(console or Console()) as own:
            return run_pipeline(cfg, stages, force=force, dry_run=dry_run, tracking_uri=tracking_uri,
                                progress=progress, run_id=run_id, parent_tracker=parent_tracker,
                                stage_concurrency=stage_concurrency, view=own)
    resolved = ResolvedConfig.of(cfg)
    cfg = resolved.cfg
    store = Store(cfg.store)
    items = plan(cfg, stages, store, force)
    view.plan(plan_table([(it, it.status) for it in items], cfg))
    if dry_run:
        view.console.print_json(resolved.json())
        return RunSummary(run_id="dry-run", status="DRY_RUN", statuses={it.stage.name: it.status for it in items})

    run_id = run_id or new_run_id()
    log_path, log_upload = run_log_path(store.root, run_id)
    view.open_log(log_path, upload_to=log_upload, title=f"run {run_id} ({cfg.name})")
    tracker = parent_tracker or make_tracker(cfg, run_id, tracking_uri, store)
    # secrets never reach the store: credentials come from the environment, not from configs
    record = {"run_id": run_id, "recipe": cfg.name, "config": resolved.public, "status": "RUNNING",
              "tracking_uri": redact("uri", tracker.uri),
              "started": _dt.datetime.now().isoformat(timespec="seconds"), "mlflow_run_id": tracker.run_id,
              "log": log_upload or log_path,
              "stages": {it.stage.name: {"key": it.key, "status": it.status} for it in items}}
    store.save_run(run_id, record)
    tracker.params(resolved.params())
    tracker.text(resolved.json(), "config.json")
    summary = RunSummary(run_id=run_id, status="RUNNING", mlflow_run_id=tracker.run_id,
                         ui_hint=redact("uri", tracker.ui_hint))
    results: dict[str, StageResult] = {}

    # --- stage loop (jobs.run.scheduler: sequential by default, independent stages at once on a cluster) ---
    def run_item(it: PlanItem) -> tuple[StageResult, str]:  # on a scheduler thread when stages run at once
        name = it.stage.name
        child = tracker.child(name, tags={"vitpipe.stage": name, "vitpipe.key": it.key, "vitpipe.run_id": run_id})
        if not it.will_run:
            res = it.cached
            view.cached(name, f"key {it.key}, produced by MLflow run {res.mlflow_run_id}, {res.seconds:.1f}s then")
            child.tags({"cached": "true", "produced_by": str(res.mlflow_run_id)})
            child.metrics(res.metrics)
            for d in res.info.get("datasets", ()):  # a stage's dataset inputs (pretrain: its training data)
                child.dataset(**d)
            child.finish()
            return res, "cached"
        return _run_stage(it, cfg, store, results, child, run_id, progress, view), "ran"

    def record_item(it: PlanItem, out: tuple[StageResult, str]) -> None:  # always on this thread
        res, status = out
        name = it.stage.name
        summary.statuses[name] = status
        results[name] = res
        record["stages"][name] = {"key": it.key, "status": status, "seconds": round(res.seconds, 2),
                                  "mlflow_run_id": res.mlflow_run_id}
        store.save_run(run_id, record)
        for d in res.info.get("datasets", ()):  # the runs table's Dataset column: what this run trains on
            tracker.dataset(**d)

    try:
        run_stages(items, cfg, run_item, record_item, concurrency=stage_concurrency)
        summary.status = "FINISHED"
    # --- end of the stage loop ---
    except BaseException as e:
        summary.status = "FAILED"
        record["status"] = "FAILED"
        record["error"] = redact_text(f"{type(e).__name__}: {e}")  # messages quote URLs, env, configs
        store.save_run(run_id, record)
        tracker.tags({"error": record["error"][:5000]})
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    summary.results = results
    record["status"] = "FINISHED"
    record["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
    store.save_run(run_id, record)
    # each stage's results once (eval/<task>/..., ingest/num_samples, ...), and the time of those that ran
    tracker.metrics({**parent_metrics({s: r.metrics for s, r in results.items()}),
                     **{f"{STAGE_SECONDS}/{s}": r.seconds for s, r in results.items()
                        if summary.statuses.get(s) == "ran"}})
    if "report" in results:
        tracker.text(results["report"].info.get("markdown", ""), "report.md")  # the parent run shows the table
    tracker.finish()
    return summary


def _run_stage(it: PlanItem, cfg: PipelineConfig, store: Store, results: dict[str, StageResult], child: Tracker,
               run_id: str, progress: bool, view: RunView) -> StageResult:
    name = it.stage.name
    url = store.stage_url(name, it.key)
    if it.forced:
        remove(url)  # a forced stage starts from nothing, never from a half-trusted older output
    bar = view.started(name, it.key)
    ctx = StageContext(key=it.key, url=url, store=store, inputs={d: results[d] for d in it.stage.inputs(cfg)},
                       tracker=child, run_id=run_id, report=bar if progress else NULL_PROGRESS)
    t0 = time.perf_counter()
    try:
        child.params(flatten(redact_tree(to_dict(it.stage.reads(cfg)))))  # the sections the stage reads
        res = it.stage.run(cfg, ctx)
    except BaseException as e:
        view.failed(name, e, time.perf_counter() - t0)
        child.tags({"error": redact_text(traceback.format_exc())[-5000:]})
        child.finish("FAILED")
        raise
    res.seconds = time.perf_counter() - t0
    res.mlflow_run_id = child.run_id
    store.save_result(res)  # written last: present means done
    child.metrics({**{k: v for k, v in res.metrics.items() if isinstance(v, (int, float))},
                   STAGE_SECONDS: res.seconds})
    child.finish()
    view.done(name, res.seconds)
    return res


# ------------------------------------------------------------------------------------------ continuing a run
def attach_parent(cfg: PipelineConfig, record: dict | None, uri: str | None, label: str) -> Tracker | None:
    """The run's MLflow parent, re-opened (status RUNNING) for another attempt whose stage runs carry ``label``;
    None when the run has none."""
    if not (record and record.get("mlflow_run_id") and cfg.tracking.enabled):
        return None
    from mlflow.exceptions import MlflowException

    try:
        tracker = MlflowTracker.attach(uri, record["mlflow_run_id"], child_tags={"vitpipe.attempt": label})
    except MlflowException:
        raise ConfigError(f"MLflow run {record['mlflow_run_id']} of run {record['run_id']} not found at "
                          f"{redact('uri', uri)}; pass --tracking-uri (the server it was tracked on)") from None
    tracker.client.update_run(tracker.run_id, status="RUNNING")
    return tracker


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def execute(cfg: PipelineConfig, run_id: str, *, force: tuple[str, ...] = (), tracking_uri: str | None = None,
            console: Console, label: str = "run", progress: bool = True, view: RunView | None = None) -> RunSummary:
    """Run ``cfg`` as run ``run_id``; an existing run record means another attempt under the same MLflow parent."""
    store = Store(cfg.store)
    record = store.load_run(run_id) if exists(store.run_url(run_id)) else None
    # the run's MLflow parent lives where it was tracked: the record says where, unless told otherwise
    uri = tracking_uri_for(cfg, tracking_uri or recorded_tracking_uri(record)) if cfg.tracking.enabled else None
    parent = attach_parent(cfg, record, uri, label) if record else None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `vitpipe stop` / ray job stop send SIGTERM
    try:
        summary = run_pipeline(cfg, stages_for(cfg), force=force, tracking_uri=uri, console=console,
                               progress=progress, run_id=run_id, parent_tracker=parent, view=view)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return summary


def load_run(store: str, run_id: str) -> tuple[PipelineConfig, dict]:
    """The stored config (typed) and record of ``run_id``."""
    from vitpipe.jobs.config import PipelineConfig
    from vitpipe.jobs.core.configtools import from_dict

    record = Store(store).load_run(run_id)
    return from_dict(PipelineConfig, record["config"]), record
