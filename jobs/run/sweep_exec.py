"""Running a sweep's points: one MLflow sweep run with every point's pipeline run nested under it, failed points
recorded and skipped past, and ``--resume`` redoing only what did not finish.

Where the points run. On this machine (no ``RAY_ADDRESS``, not a Ray job) one at a time, in this process: a
laptop's cores are one point's worth, and a point's own stages already use them. On a cluster as many at once as
its resources hold (``sweep_concurrency``: the cluster's CPUs / GPUs over the most one point holds at a time),
each point as a Ray task (no CPU of its own: its stages request theirs) running the same ``run_pipeline``; a
point waits while another running point produces a stage it needs (``claims``, checked against the store's
``result.json`` files), so a shared ingest runs once, not once per model. Ray Tune's ``Tuner`` was the other
candidate: it cannot hold a trial back until another trial's stage is done, so two trials would ingest the same
shards at once, and its experiment state would be a second record beside ``sweep.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from rich.console import Console

from vitpipe.jobs.core.store import exists
from vitpipe.jobs.run.runner import run_pipeline, tracking_uri_for
from vitpipe.jobs.run.scheduler import CANCEL_WAIT_S, default_concurrency, on_cluster
from vitpipe.jobs.run.sweep import DONE, Point, Sweep, claims, resume_command
from vitpipe.jobs.run.sweep_report import write_sweep_report
from vitpipe.jobs.core.secrets import redact, redact_text
from vitpipe.jobs.stages import stages_for
from vitpipe.jobs.core.tracking import MlflowTracker, NullTracker, Tracker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PointJob:
    """Everything a point's run needs, in this process or in a Ray task."""

    index: int
    cfg: Any
    run_id: str
    tracking_uri: str | None
    mlflow_run_id: str | None
    """The point's MLflow run (nested under the sweep run), made by the sweep driver."""
    attempt: str | None
    """Label of another attempt of an existing run (resume); None for a first attempt."""
    progress: bool = False
    stage_concurrency: int | None = None


@dataclass(frozen=True)
class PointOutcome:
    status: str
    error: str | None
    seconds: float


def run_point(job: PointJob, console: Console | None = None) -> PointOutcome:
    """One point's pipeline run under its MLflow run; an error becomes a FAILED outcome (an interrupt is raised)."""
    tracker: Tracker = NullTracker()
    if job.mlflow_run_id and job.tracking_uri:
        tracker = MlflowTracker.attach(job.tracking_uri, job.mlflow_run_id,
                                       child_tags={"vitpipe.attempt": job.attempt} if job.attempt else None)
        if job.attempt:
            tracker.client.update_run(tracker.run_id, status="RUNNING")
    t0 = time.perf_counter()
    try:
        run_pipeline(job.cfg, stages_for(job.cfg), tracking_uri=job.tracking_uri,
                     console=console or Console(file=sys.stdout, width=160, no_color=True), progress=job.progress,
                     run_id=job.run_id, parent_tracker=tracker, stage_concurrency=job.stage_concurrency)
    except Exception as e:  # noqa: BLE001 - a failed point must not stop the others
        tracker.finish("FAILED")  # also when the run failed before its tracking started
        return PointOutcome("FAILED", redact_text(f"{type(e).__name__}: {e}")[:2000], time.perf_counter() - t0)
    return PointOutcome(DONE, None, time.perf_counter() - t0)


def _point_task(job: PointJob) -> PointOutcome:
    return run_point(job)


# ------------------------------------------------------------------------------------------------ concurrency
def point_peak(cfg: Any) -> dict[str, float]:
    """The most CPUs / GPUs one point holds at once: its pretraining worker group, or its evaluation branches
    together (they may run at the same time)."""
    p, f = cfg.pretrain, cfg.finetune
    pre = {"CPU": p.num_workers * p.cpus_per_worker if "pretrain" in cfg.stages else 0.0,
           "GPU": float(p.num_workers) if "pretrain" in cfg.stages and p.use_gpu else 0.0}
    after = {"CPU": (f.num_workers * f.cpus_per_worker if "finetune" in cfg.stages else 0.0)
             + (cfg.fewshot.threads if "fewshot" in cfg.stages else 0.0) + (1.0 if "analysis" in cfg.stages else 0.0),
             "GPU": float(f.num_workers) if "finetune" in cfg.stages and getattr(f, "use_gpu", False) else 0.0}
    return {k: max(1.0 if k == "CPU" else 0.0, pre[k], after[k]) for k in ("CPU", "GPU")}


def sweep_concurrency(points: list[Point], requested: int | None = None) -> int:
    """``requested``, else 1 on this machine, else how many points the cluster's resources hold at once."""
    if requested is not None:
        return max(1, requested)
    if not on_cluster() or len(points) < 2:
        return 1
    import ray

    from vitpipe.jobs.core.raytools import ensure_ray

    ensure_ray()
    have = ray.cluster_resources()
    n = len(points)
    for pt in points:
        need = point_peak(pt.cfg)
        for k in ("CPU", "GPU"):
            if need[k] > 0:
                n = min(n, math.floor(have.get(k, 0.0) / need[k]))
    return max(1, n)


# ------------------------------------------------------------------------------------------------ the sweep
def _sweep_tracker(sw: Sweep, tracking_uri: str | None) -> Tracker:
    cfg = sw.base
    if not cfg.tracking.enabled:
        return NullTracker()
    uri = tracking_uri_for(cfg, tracking_uri)
    if sw.mlflow_run_id:  # a resume: the same sweep run, open again
        tracker = MlflowTracker.attach(uri, sw.mlflow_run_id)
        tracker.client.update_run(tracker.run_id, status="RUNNING")
        return tracker
    artifacts = cfg.tracking.artifact_location or (sw.store.root + "/mlartifacts" if uri.startswith("sqlite:")
                                                   else None)
    tracker = MlflowTracker.start(uri, cfg.tracking.experiment, run_name=f"sweep-{sw.recipe}-{sw.sweep_id}",
                                  tags={"vitpipe.sweep_id": sw.sweep_id, "vitpipe.recipe": sw.recipe,
                                        "vitpipe.kind": "sweep"}, artifact_location=artifacts)
    tracker.params({"sweep.points": len(sw.points), "sweep.recipe": sw.recipe,
                    # one param per key (MLflow keys cannot hold '+'); keys that move together share an axis
                    "sweep.axes": " x ".join("+".join(a.keys) for a in sw.axes),
                    **{f"sweep.axis.{k}": ",".join(v[j] for v in a.values)
                       for a in sw.axes for j, k in enumerate(a.keys)},
                    **{f"sweep.set.{i}": s for i, s in enumerate(sw.sets)}})
    return tracker


def _point_tracker(sw: Sweep, pt: Point, parent: Tracker) -> str | None:
    """The point's MLflow run under the sweep run (coordinates as params and tags); its id."""
    child = parent.child(f"{pt.cfg.name}-{pt.run_id}", tags={
        "vitpipe.run_id": pt.run_id, "vitpipe.recipe": pt.cfg.name, "vitpipe.sweep_id": sw.sweep_id,
        "vitpipe.point": str(pt.index), **{f"vitpipe.coord.{k}": v for k, v in pt.coords.items()}})
    child.params({f"sweep.{k}": v for k, v in pt.coords.items()})
    return child.run_id


def run_sweep(sw: Sweep, *, tracking_uri: str | None = None, console: Console | None = None,
              concurrency: int | None = None, progress: bool | None = None) -> Sweep:
    """Run every point of ``sw`` that has not finished (all of them for a new sweep), then its report. Returns the
    sweep with its points' statuses; FAILED when any point failed (the others still ran). ``progress``: progress
    bars of points run here (None: when the console is a terminal)."""
    console = console or Console()
    progress = console.is_terminal if progress is None else progress
    tracker = _sweep_tracker(sw, tracking_uri)
    uri = tracker.uri
    sw.mlflow_run_id, sw.tracking_uri = tracker.run_id, redact("uri", uri) if uri else None
    sw.status, sw.finished = "RUNNING", None
    fresh = all(p.status == "PENDING" for p in sw.points)
    attempt = None if fresh else f"sweep-resume-{time.strftime('%Y%m%d-%H%M%S')}"
    todo = [p for p in sw.points if p.status != DONE]
    n = sweep_concurrency(todo, concurrency)
    stage_n = default_concurrency() if n > 1 else None
    jobs = []
    for pt in todo:
        again = pt.mlflow_run_id is not None and attempt is not None
        jobs.append(PointJob(index=pt.index, cfg=pt.cfg, run_id=pt.run_id, tracking_uri=uri,
                             mlflow_run_id=pt.mlflow_run_id, attempt=attempt if again else None,
                             progress=n == 1 and progress, stage_concurrency=stage_n))
    sw.save()
    console.print(f"sweep [bold]{sw.sweep_id}[/]: {len(todo)} of {len(sw.points)} points to run, {n} at a time",
                  highlight=False)

    def done(job: PointJob, out: PointOutcome) -> None:
        pt = sw.points[job.index]
        pt.status, pt.error, pt.seconds = out.status, out.error, round(out.seconds, 1)
        sw.save()
        style = "green" if out.status == DONE else "red"
        console.print(f"[{style}]{out.status}[/] point [{pt.index}] {pt.label} ({out.seconds:.0f}s)"
                      + (f": {out.error.splitlines()[0][:300]}" if out.error else ""), highlight=False)

    def started(job: PointJob) -> PointJob:
        """The job with its point's MLflow run, made now (a point waiting its turn shows no RUNNING run)."""
        pt = sw.points[job.index]
        if pt.mlflow_run_id is None:
            pt.mlflow_run_id = _point_tracker(sw, pt, tracker)
        pt.status = "RUNNING"
        sw.save()
        console.print(f"[yellow]▶[/] point [{pt.index}] {pt.label} (run {pt.run_id})", highlight=False)
        return dataclasses.replace(job, mlflow_run_id=pt.mlflow_run_id)

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if main else None
    try:
        if n == 1:
            for job in jobs:
                job = started(job)
                done(job, run_point(job, console))
        else:
            _run_concurrently(sw, jobs, n, started, done)
    except BaseException as e:
        for pt in sw.points:
            if pt.status == "RUNNING":
                pt.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        sw.status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        sw.save()
        tracker.tags({"error": redact_text(f"{type(e).__name__}: {e}")[:5000]})
        tracker.finish(sw.status)
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    failed = [p for p in sw.points if p.status != DONE]
    sw.status = DONE if not failed else "FAILED"
    sw.report = write_sweep_report(sw, tracker, resume_command(sw) if failed else None)
    sw.finished = _dt.datetime.now().isoformat(timespec="seconds")
    sw.save()
    tracker.tags({"failed_points": ",".join(str(p.index) for p in failed) or "none",
                  **({"resume": resume_command(sw)} if failed else {})})
    tracker.finish(sw.status)
    return sw


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _run_concurrently(sw: Sweep, jobs: list[PointJob], n: int, started: Callable[[PointJob], PointJob],
                      done: Callable[[PointJob, PointOutcome], None]) -> None:
    """Up to ``n`` points at once as Ray tasks; a point starts only when no running point is producing one of the
    stages it would run (module doc)."""
    import ray

    from vitpipe.jobs.core.raytools import ensure_ray

    ensure_ray()  # vitpipe's head (token auth, loopback) or the job's cluster, never a bare ray.init()
    task = ray.remote(num_cpus=0, max_retries=0)(_point_task)
    want = claims([sw.points[j.index] for j in jobs])
    finished_keys: set[tuple[str, str]] = set()

    def open_claims(index: int) -> set[tuple[str, str]]:
        for k in want[index] - finished_keys:
            if exists(sw.store.result_url(*k)):
                finished_keys.add(k)
        return want[index] - finished_keys

    pending, running = list(jobs), {}
    try:
        while pending or running:
            busy: set[tuple[str, str]] = set()
            for job in running.values():
                busy |= open_claims(job.index)
            for job in list(pending):
                if len(running) >= n:
                    break
                mine = open_claims(job.index)
                if mine & busy:
                    continue
                busy |= mine
                pending.remove(job)
                job = started(job)
                running[task.options(name=f"vitpipe-point-{job.index}").remote(job)] = job
            ready, _ = ray.wait(list(running), num_returns=1, timeout=2.0)
            for ref in ready:
                job = running.pop(ref)
                try:
                    out = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - the task itself died (node lost, OOM): this point failed
                    out = PointOutcome("FAILED", redact_text(f"{type(e).__name__}: {e}")[:2000], 0.0)
                done(job, out)
    except BaseException:
        for ref in running:  # force=False: the point sees KeyboardInterrupt and ends its MLflow runs KILLED
            ray.cancel(ref, force=False)
        if running:
            ray.wait(list(running), num_returns=len(running), timeout=CANCEL_WAIT_S)
        raise
