"""Ray job submission for vitpipe: ship the code and a resolved config to a cluster, then judge the job.

``submit`` stages the project code (minus .git, venvs, runs, data, caches) as the job's ``working_dir`` under a
folder named ``vitpipe`` so that ``import vitpipe`` in the driver and in every Ray worker resolves to the submitted
code, not to whatever is installed on the cluster image. The resolved config travels as ``vitpipe_job.json`` next to
it (not in the entrypoint or env vars, which the dashboard shows to everyone). The entrypoint is
``<python> -m vitpipe.jobs.cli driver vitpipe_job.json``: the same stages as ``vitpipe run``, with a run id chosen
here, so ``<store>/runs/<run_id>/run.json`` links the Ray job to its MLflow parent run.

A job is judged by its Ray status *and* by what the pipeline left in the store (run.json status, each stage's
``result.json``), never by the end of its log stream.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.store import Store, exists, local_path
from vitpipe.jobs.tracking import redact

# Never uploaded: VCS, environments, run outputs, data, caches, build and benchmark outputs (Ray caps uploads).
CODE_EXCLUDES: tuple[str, ...] = (
    ".git", ".venv", "venv", ".tox", ".nox", "runs", "mlruns", "mlartifacts", "mlflow.db", "data", "*.egg-info",
    "build", "dist", "__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    "benchmarks/out", "benchmarks/results", ".evaldata", ".ci", ".whl", ".gl", ".device-out", "*.ckpt", "*.pt",
    "*.tar", "*.npz",
)
UPLOAD_LIMIT_BYTES = 100 << 20  # far below Ray's 512 MiB cap; code larger than this is a mistake (data, outputs)
JOB_FILE = "vitpipe_job.json"
# Forwarded to the job when set here: settings, never secrets (the dashboard shows a job's env vars to anyone).
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "VITPIPE_STORE", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "FSSPEC_S3_ENDPOINT_URL", "HF_HOME")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class ClusterError(ValueError):
    """A user-caused cluster problem (no cluster at the address, unknown job id): one line naming the cause."""


# --------------------------------------------------------------------------------------------------- connection
def is_local_address(address: str) -> bool:
    """True for a job server on this machine (the entrypoint may then use this interpreter's absolute path)."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str):
    """A ``JobSubmissionClient`` for ``address``; ClusterError (one line) when nothing answers there."""
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # explicit; shared clusters use token (infra/README.md)
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, OSError) as e:
        raise ClusterError(f"no Ray job server at {address} ({type(e).__name__}); start one with `ray start --head "
                           f"--dashboard-host=127.0.0.1` or pass --address") from None
    except RuntimeError as e:  # version/auth mismatches arrive as RuntimeError with the server's text
        raise ClusterError(f"Ray job server at {address} refused the connection: {str(e).splitlines()[0]}") from None


def job_info(client: Any, job_id: str):
    """``JobDetails`` of ``job_id``; ClusterError naming the id when the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise ClusterError(f"unknown job '{job_id}' at {client.get_address()} (see: vitpipe jobs)") from None
        raise


# --------------------------------------------------------------------------------------------------- code upload
def _excluded(rel: str, name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(rel, p) for p in patterns)


def stage_code(src: str | Path, dest: str | Path, excludes: tuple[str, ...] = CODE_EXCLUDES,
               limit_bytes: int = UPLOAD_LIMIT_BYTES) -> Path:
    """Copy the project at ``src`` to ``dest/vitpipe`` minus ``excludes``; returns ``dest``.

    The folder name matters: the repository root *is* the ``vitpipe`` package, and Ray puts the working_dir on
    ``sys.path`` of the driver and of every worker, so ``dest/vitpipe`` shadows any installed copy.
    """
    src, dest = Path(src).resolve(), Path(dest)
    total = 0

    def ignore(folder: str, names: list[str]) -> set[str]:
        nonlocal total
        rel_dir = os.path.relpath(folder, src)
        skip = set()
        for n in names:
            rel = n if rel_dir == "." else f"{rel_dir}/{n}"
            path = os.path.join(folder, n)
            if _excluded(rel, n, excludes) or os.path.islink(path):
                skip.add(n)
            elif os.path.isfile(path):
                total += os.path.getsize(path)
        if total > limit_bytes:
            raise ClusterError(f"the code to upload from {src} exceeds {limit_bytes >> 20} MiB (data or outputs "
                               f"inside the project?); move them out or add exclude patterns")
        return skip

    shutil.copytree(src, dest / "vitpipe", ignore=ignore)
    return dest


def project_root() -> Path:
    """The checkout (or installed package folder) this module belongs to."""
    return Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------- submission
@dataclass(kw_only=True)
class SubmitOptions:
    """How a pipeline becomes a Ray job."""

    address: str = "http://127.0.0.1:8265"
    """Ray job server (dashboard) URL."""
    python: str | None = None
    """Interpreter for the entrypoint; None: this one's absolute path for a local cluster, else `python` (the
    cluster image's)."""
    tracking_uri: str | None = None
    """MLflow URI for the job; None: $MLFLOW_TRACKING_URI here, else the config's / a sqlite file in the store."""
    env: tuple[str, ...] = ()
    """Extra environment variable names forwarded from here to the job (visible in the dashboard: no secrets)."""
    entrypoint_num_cpus: float = 0.0
    """CPUs reserved for the driver (0: it schedules anywhere, its stages reserve their own)."""
    entrypoint_num_gpus: float = 0.0
    """GPUs reserved for the driver (its fit() workers reserve their own)."""
    stop_grace_s: int = 30
    """Seconds `vitpipe stop` lets the driver mark its MLflow runs before it is killed."""
    force: tuple[str, ...] = ()
    """Stages to rerun even when cached (as `vitpipe run --force`)."""

    def __post_init__(self) -> None:
        if self.entrypoint_num_cpus < 0 or self.entrypoint_num_gpus < 0:
            raise ClusterError("entrypoint CPUs/GPUs must be >= 0")
        if self.stop_grace_s < 0:
            raise ClusterError(f"stop grace must be >= 0 s, got {self.stop_grace_s}")


@dataclass
class Submission:
    job_id: str
    run_id: str
    address: str
    store: str
    entrypoint: str
    metadata: dict[str, str] = field(default_factory=dict)


def resource_request(cfg: Any) -> dict[str, Any]:
    """What the pipeline's Ray Train stages ask for (recorded with the job, used to diagnose PENDING)."""
    p, f = cfg.pretrain, cfg.finetune
    req = {}
    if "pretrain" in cfg.stages:
        req["pretrain"] = {"workers": p.num_workers, "CPU": p.cpus_per_worker, "GPU": 1 if p.use_gpu else 0,
                           "strategy": p.placement_strategy}
    if "finetune" in cfg.stages:
        req["finetune"] = {"workers": f.num_workers, "CPU": f.cpus_per_worker,
                           "GPU": 1 if getattr(f, "use_gpu", False) else 0, "strategy": "PACK"}
    return req


def job_env(opts: SubmitOptions, tracking_uri: str | None) -> dict[str, str]:
    """Env vars for the job: auth mode explicit, the allow-listed settings, and what ``opts.env`` names."""
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "PYTHONUNBUFFERED": "1",
           "PYTHONWARNINGS": "ignore::DeprecationWarning", "RAY_JOB_STOP_WAIT_TIME_S": str(opts.stop_grace_s),
           # The driver's own ray.init(runtime_env=...) (raytools.ensure_ray) merges into the job's instead of
           # failing on keys both set; the job's working_dir (the submitted code) stays.
           "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    for name in (*FORWARDED_ENV, *opts.env):
        if name in os.environ:
            env[name] = os.environ[name]
        elif name in opts.env:
            raise ClusterError(f"--env {name}: not set in this environment")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    return env


def entrypoint_for(opts: SubmitOptions) -> str:
    python = opts.python or ("" if not is_local_address(opts.address) else os.path.abspath(sys.executable))
    python = python or "python"
    return f"{python} -m vitpipe.jobs.cli driver {JOB_FILE}"


def _leaves(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _leaves(v, f"{prefix}{k}.")
    elif isinstance(d, list):
        for v in d:
            yield from _leaves(v, prefix)
    else:
        yield prefix.rstrip("."), d


def check_no_credentials(cfg: Any, tracking_uri: str | None = None) -> None:
    """Refuse configs that carry secrets (a password in a URL, a secret-named key): the job file, the run record
    and the dashboard would all hold them. Credentials belong in the cluster's environment / secret store."""
    for key, value in [*_leaves(to_dict(cfg)), ("--tracking-uri", tracking_uri)]:
        # Strings only: flags such as model.class_token match the secret-name pattern but hold no secret.
        if isinstance(value, str) and value and redact(key, value) != value:
            raise ClusterError(f"'{key}' carries a credential; give it to the cluster through its environment "
                               f"(MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_* or a Kubernetes Secret), not the config")


def submit(cfg: Any, opts: SubmitOptions, *, run_id: str | None = None, client: Any = None) -> Submission:
    """Submit ``cfg`` (resolved, absolute paths) as a Ray job; returns at once with the job and run ids."""
    from vitpipe.jobs.runner import new_run_id

    check_no_credentials(cfg, opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    client = client or connect(opts.address)
    run_id = run_id or new_run_id()
    tracking_uri = opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    job = {"run_id": run_id, "config": to_dict(cfg), "force": list(opts.force), "tracking_uri": tracking_uri}
    store = Store(cfg.store).root
    metadata = {"vitpipe.run_id": run_id, "vitpipe.recipe": cfg.name, "vitpipe.store": redact("store", store),
                "vitpipe.tracking_uri": redact("uri", tracking_uri or ""),
                "vitpipe.request": json.dumps(resource_request(cfg), sort_keys=True),
                "vitpipe.entrypoint": json.dumps({"CPU": opts.entrypoint_num_cpus, "GPU": opts.entrypoint_num_gpus})}
    entrypoint = entrypoint_for(opts)
    with tempfile.TemporaryDirectory(prefix="vitpipe-submit-") as tmp:
        stage_code(project_root(), tmp)
        Path(tmp, JOB_FILE).write_text(json.dumps(job, indent=2))
        runtime_env = {"working_dir": tmp, "env_vars": job_env(opts, tracking_uri)}
        job_id = client.submit_job(entrypoint=entrypoint, submission_id=f"vitpipe-{run_id}", runtime_env=runtime_env,
                                   metadata=metadata, entrypoint_num_cpus=opts.entrypoint_num_cpus or None,
                                   entrypoint_num_gpus=opts.entrypoint_num_gpus or None)
    return Submission(job_id=job_id, run_id=run_id, address=opts.address, store=store, entrypoint=entrypoint,
                      metadata=metadata)


# --------------------------------------------------------------------------------------------------- judging
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
    if record:
        rep.run_status, rep.mlflow_run_id = record.get("status"), record.get("mlflow_run_id")
        rep.stages = _stage_states(record)
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
        if record is None:
            rep.verdict, rep.reason = "FAILED", f"job exited 0 but wrote no run record under {rep.store}"
        elif record.get("status") != "FINISHED":
            rep.verdict, rep.reason = "FAILED", f"job exited 0 but run.json says {record.get('status')}"
        elif missing:
            rep.verdict, rep.reason = "FAILED", f"job exited 0 but stage '{missing[0]}' has no result.json"
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
    """After a stop or a hard kill, mark what the driver could not: run.json STOPPED, MLflow runs KILLED."""
    if rep.ray_status not in ("STOPPED", "FAILED"):
        return
    record = _run_record(rep.store, rep.run_id)
    if record and record.get("status") == "RUNNING":
        record["status"] = "STOPPED" if rep.ray_status == "STOPPED" else "FAILED"
        record["error"] = record.get("error") or f"Ray job {rep.job_id} ended {rep.ray_status} before the driver did"
        Store(record["config"]["store"]).save_run(rep.run_id, record)
        rep.run_status = record["status"]
    if record and record.get("mlflow_run_id"):
        uri = os.environ.get("MLFLOW_TRACKING_URI") or record["config"]["tracking"].get("uri")
        store = record["config"]["store"]
        if not uri and local_path(store) and os.path.exists(os.path.join(local_path(store), "mlflow.db")):
            uri = f"sqlite:///{os.path.join(local_path(store), 'mlflow.db')}"  # the runner's default
        if uri:
            close_mlflow_runs(uri, record["mlflow_run_id"], "KILLED" if rep.ray_status == "STOPPED" else "FAILED")


# MLflow side of a job (closing its runs, linking to it): its own module, re-exported here.
from vitpipe.jobs.cluster_mlflow import close_mlflow_runs, mlflow_link  # noqa: E402,F401


# Why a job or its workers wait for resources: in their own module, re-exported for callers of `cluster`.
from vitpipe.jobs.cluster_diagnose import cluster_resources, diagnose, pending_workers  # noqa: E402,F401
