"""A submitted job judged by Ray's status *and* the store's evidence (run.json, each stage's ``result.json``),
never by the end of its log stream; listing, log following and stopping, with the run record and MLflow runs
reconciled after a stop or a hard kill."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from vitpipe.jobs.cluster.submit import TERMINAL, job_info
from vitpipe.jobs.cluster.links import close_mlflow_runs
from vitpipe.jobs.core.store import Store, exists, local_path
from vitpipe.jobs.core.tracking import recorded_tracking_uri


@dataclass
class JobReport:
    """A job judged by Ray's status and the store's evidence. ``verdict``: RUNNING, PENDING, SUCCEEDED, FAILED,
    STOPPED; ``reason`` says why when it is not SUCCEEDED."""

    job_id: str
    ray_status: str
    verdict: str
    reason: str = ""
    run_id: str | None = None
    store: str | None = None
    recipe: str = ""
    run_status: str | None = None
    stages: dict[str, str] = field(default_factory=dict)  # stage -> done / running / failed / waiting
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    start_time: float | None = None  # seconds since epoch
    end_time: float | None = None
    kind: str = "run"  # "sweep" for a submitted sweep: run_id is its sweep id, stages its points
    diagnosis: str = ""

    @property
    def ok(self) -> bool:
        return self.verdict == "SUCCEEDED"


def _run_record(store: str | None, run_id: str | None) -> dict | None:
    if not (store and run_id):
        return None
    try:
        s = Store(store)
        return s.load_run(run_id) if exists(s.run_url(run_id)) else None
    except Exception:  # noqa: BLE001 - an unreadable store is reported as "no record", with the reason below
        return None


def _sweep_record(store: str | None, sweep_id: str | None) -> dict | None:
    """A submitted sweep's evidence in the run-record shape ``judge`` reads: its status and, in place of stages, one
    state per point (``[i]``), from the sweep's ``sweep.json``."""
    if not (store and sweep_id):
        return None
    from vitpipe.jobs.run.sweep import DONE, load_sweep, sweep_url

    try:
        if not exists(sweep_url(Store(store), sweep_id)):
            return None
        sw = load_sweep(store, sweep_id)
    except Exception:  # noqa: BLE001 - an unreadable store is reported as "no record", as for a run
        return None
    states = {f"[{p.index}]": "done" if p.status == DONE else ("failed" if p.status == "FAILED" else "waiting")
              for p in sw.points}
    return {"status": sw.status, "mlflow_run_id": sw.mlflow_run_id, "points": states,
            "error": f"points failed: {', '.join(k for k, v in states.items() if v == 'failed')}"
            if sw.status == "FAILED" else None}


def _stage_states(record: dict) -> dict[str, str]:
    store = Store(record["config"]["store"])
    stages = record.get("stages", {})
    order = [n for n in record["config"].get("stages", []) if n in stages] + sorted(set(stages) - set(
        record["config"].get("stages", [])))  # config order is topological; run.json keys are sorted
    states = {}
    for name in order:
        st = stages[name]
        if exists(store.result_url(name, st["key"])):
            states[name] = "done"
        else:
            states[name] = "failed" if record.get("status") == "FAILED" else "waiting"
    running = [n for n, s in states.items() if s == "waiting"]
    if running and record.get("status") == "RUNNING":
        states[running[0]] = "running"
    if record.get("status") == "FAILED" and (failed := [n for n, s in states.items() if s == "failed"]):
        for n in failed[1:]:
            states[n] = "not run"
    return states


def judge(info: Any, record: dict | None) -> JobReport:
    """Combine Ray's ``JobDetails`` with the run record; success needs both to agree and every result.json."""
    md = info.metadata or {}
    rep = JobReport(job_id=info.submission_id or info.job_id, ray_status=str(info.status.value
                    if hasattr(info.status, "value") else info.status), verdict="", run_id=md.get("vitpipe.run_id"),
                    store=md.get("vitpipe.store"), recipe=md.get("vitpipe.recipe", ""),
                    tracking_uri=md.get("vitpipe.tracking_uri") or None,
                    start_time=info.start_time / 1000 if info.start_time else None,
                    end_time=info.end_time / 1000 if info.end_time else None)
    if md.get("vitpipe.sweep_id"):
        rep.run_id, rep.kind = md["vitpipe.sweep_id"], "sweep"
    if record:
        rep.run_status, rep.mlflow_run_id = record.get("status"), record.get("mlflow_run_id")
        rep.stages = dict(record["points"]) if "points" in record else _stage_states(record)
    message = (info.message or "").strip().splitlines()
    if rep.ray_status in ("PENDING", "RUNNING"):
        rep.verdict = rep.ray_status
    elif rep.ray_status == "STOPPED":
        rep.verdict, rep.reason = "STOPPED", "stopped by a user (vitpipe stop)"
    elif rep.ray_status == "FAILED":
        rep.verdict = "FAILED"
        rep.reason = _one_line((record or {}).get("error") or "\n".join(message) or "the driver failed")
    else:  # SUCCEEDED: only if the store agrees
        missing = [n for n, s in rep.stages.items() if s != "done"]
        what = "sweep.json" if rep.kind == "sweep" else "run.json"
        if record is None:
            rep.verdict, rep.reason = "FAILED", (f"job exited 0 but wrote no {rep.kind} record ({what}) under "
                                                 f"{rep.store}")
        elif record.get("status") != "FINISHED":
            rep.verdict, rep.reason = "FAILED", f"job exited 0 but {what} says {record.get('status')}"
        elif missing:
            rep.verdict, rep.reason = "FAILED", (f"job exited 0 but point {missing[0]} did not finish" if
                                                 "points" in record else
                                                 f"job exited 0 but stage '{missing[0]}' has no result.json")
        else:
            rep.verdict = "SUCCEEDED"
    return rep


def _one_line(text: str) -> str:
    """Wrapped errors (Ray Train's WorkerGroupError, job messages) put the cause on their last line."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} … {lines[-1]}"


def report(client: Any, job_id: str) -> JobReport:
    info = job_info(client, job_id)
    md = info.metadata or {}
    if md.get("vitpipe.sweep_id"):
        return judge(info, _sweep_record(md.get("vitpipe.store"), md["vitpipe.sweep_id"]))
    return judge(info, _run_record(md.get("vitpipe.store"), md.get("vitpipe.run_id")))


def wait(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 2.0) -> JobReport:
    """Poll until the job is terminal (or ``timeout_s`` passes); returns the last report."""
    t0 = time.monotonic()
    while True:
        rep = report(client, job_id)
        if rep.ray_status in TERMINAL or (timeout_s is not None and time.monotonic() - t0 > timeout_s):
            return rep
        time.sleep(poll_s)


def list_reports(client: Any, limit: int = 20) -> list[JobReport]:
    """Recent vitpipe jobs (newest first) with their run records."""
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("vitpipe.run_id")]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    return [judge(j, _run_record(j.metadata.get("vitpipe.store"), j.metadata.get("vitpipe.run_id")))
            for j in jobs[:limit]]


def follow_logs(client: Any, job_id: str) -> Iterator[str]:
    """Yield log chunks until the job ends (the stream's end says nothing about success: judge afterwards)."""
    import asyncio

    job_info(client, job_id)
    agen = client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()


def stop(client: Any, job_id: str, timeout_s: float = 60.0) -> JobReport:
    """Stop a job, wait for it to end, and make sure its run record and MLflow runs are not left RUNNING."""
    info = job_info(client, job_id)
    status = str(getattr(info.status, "value", info.status))
    if status not in TERMINAL:
        client.stop_job(job_id)
    # A job whose driver was never placed cannot run Ray's stop (it goes through the unplaced supervisor).
    rep = wait(client, job_id, timeout_s=min(timeout_s, 15.0) if status == "PENDING" else timeout_s, poll_s=1.0)
    if rep.ray_status == "PENDING":
        rep.reason = ("Ray cannot stop a job whose driver was never placed; it fails by itself after the head's "
                      "RAY_JOB_START_TIMEOUT_SECONDS (default 900 s), or starts once the resources exist")
    reconcile_stopped(rep)
    return rep


def reconcile_stopped(rep: JobReport) -> None:
    """After a stop or a hard kill, mark what the driver could not: run.json STOPPED, MLflow runs KILLED; for a
    sweep, sweep.json and its unfinished points too (``vitpipe sweep --resume`` reruns them)."""
    if rep.ray_status not in ("STOPPED", "FAILED"):
        return
    if rep.kind == "sweep":
        _reconcile_sweep(rep)
        return
    status = _reconcile_run(rep.store, rep.run_id, rep.job_id, rep.ray_status)
    rep.run_status = status or rep.run_status


def _reconcile_run(store: str | None, run_id: str | None, job_id: str, ray_status: str) -> str | None:
    """One run's record and MLflow runs closed after its job ended; the record's status (None: no record)."""
    record = _run_record(store, run_id)
    if record and record.get("status") == "RUNNING":
        record["status"] = "STOPPED" if ray_status == "STOPPED" else "FAILED"
        record["error"] = record.get("error") or f"Ray job {job_id} ended {ray_status} before the driver did"
        Store(record["config"]["store"]).save_run(run_id, record)
    if record and record.get("mlflow_run_id"):
        uri = _tracking_uri(record)
        if uri:
            close_mlflow_runs(uri, record["mlflow_run_id"], "KILLED" if ray_status == "STOPPED" else "FAILED")
    return record.get("status") if record else None


def _tracking_uri(record: dict) -> str | None:
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or recorded_tracking_uri(record)
           or record["config"]["tracking"].get("uri"))
    return uri or _store_sqlite_uri(record["config"]["store"])


def _store_sqlite_uri(store: str) -> str | None:
    """The runner's default tracking URI for ``store`` (its sqlite file), where the file exists."""
    path = local_path(store)
    if path and os.path.exists(os.path.join(path, "mlflow.db")):
        return f"sqlite:///{os.path.join(path, 'mlflow.db')}"
    return None


def _reconcile_sweep(rep: JobReport) -> None:
    from vitpipe.jobs.run.sweep import load_sweep

    try:
        sw = load_sweep(rep.store, rep.run_id)
    except (FileNotFoundError, ValueError, KeyError):
        return
    if sw.status != "RUNNING":
        return
    for pt in sw.points:
        if pt.status == "RUNNING":
            _reconcile_run(rep.store, pt.run_id, rep.job_id, rep.ray_status)
            pt.status, pt.error = "KILLED", pt.error or f"Ray job {rep.job_id} ended {rep.ray_status}"
    sw.status = "STOPPED" if rep.ray_status == "STOPPED" else "FAILED"
    sw.save()
    rep.run_status = sw.status
    uri = (os.environ.get("MLFLOW_TRACKING_URI") or sw.tracking_uri or sw.base.tracking.uri
           or _store_sqlite_uri(sw.store.root))
    if uri and sw.mlflow_run_id and "***" not in uri:
        close_mlflow_runs(uri, sw.mlflow_run_id, "KILLED" if rep.ray_status == "STOPPED" else "FAILED")
