"""Cluster verbs of the ``vitpipe`` CLI: submit/status/logs/stop/jobs (Ray jobs), driver, rerun/resume, plan.

``register(app, console)`` is called by :mod:`vitpipe.jobs.cli` at import. The run-level operations (driver, rerun,
resume) share :func:`execute`: run a stored config under a given run id, re-attaching to the run's MLflow parent when
it has one, with SIGTERM turned into a clean FAILED/KILLED ending instead of runs left RUNNING.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from vitpipe.jobs import cluster, cluster_diagnose, cluster_mlflow, cluster_status
from vitpipe.jobs.configtools import ConfigError, from_dict
from vitpipe.jobs.tracking import redact

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, cluster.ClusterError)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_ADDRESS_ENV = ["RAY_API_SERVER_ADDRESS"]
VERDICT_STYLE = {"SUCCEEDED": "green", "RUNNING": "yellow", "PENDING": "yellow", "FAILED": "red", "STOPPED": "red"}


class _Attempt:
    """The re-attached MLflow parent of a run: stage child runs it opens carry the attempt's label."""

    def __init__(self, tracker: Any, label: str):
        self._tracker, self._label = tracker, label

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tracker, name)

    def child(self, name: str, tags: dict[str, str] | None = None) -> Any:
        return self._tracker.child(name, tags={**(tags or {}), "vitpipe.attempt": self._label})


def _pending_workers(address: str, info: Any) -> dict[str, str]:
    """``cluster_diagnose.pending_workers``, or {} when the state API cannot answer (a node just lost, a dashboard restarting):
    the diagnosis is a bonus, the verdict must still print."""
    try:
        return cluster_diagnose.pending_workers(address, info)
    except Exception as e:  # noqa: BLE001 - RayStateApiException, timeouts, connection errors alike
        import logging

        logging.getLogger(__name__).warning("no placement diagnosis (state API: %s)", str(e).splitlines()[0][:200])
        return {}


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def tracking_uri_for(cfg: Any, override: str | None) -> str:
    from vitpipe.jobs.store import Store
    from vitpipe.jobs.tracking import default_tracking_uri

    return override or cfg.tracking.uri or default_tracking_uri(Store(cfg.store).root)


def attach_parent(cfg: Any, record: dict | None, uri: str, label: str) -> Any:
    """The run's MLflow parent, re-opened (status RUNNING) for another attempt; None when there is none."""
    if not (record and record.get("mlflow_run_id") and cfg.tracking.enabled):
        return None
    from mlflow.exceptions import MlflowException

    from vitpipe.jobs.tracking import MlflowTracker

    try:
        tracker = MlflowTracker.attach(uri, record["mlflow_run_id"])
    except MlflowException:
        raise ConfigError(f"MLflow run {record['mlflow_run_id']} of run {record['run_id']} not found at "
                          f"{redact('uri', uri)}; pass --tracking-uri (the server it was tracked on)") from None
    tracker.client.update_run(tracker.run_id, status="RUNNING")
    return _Attempt(tracker, label)


def execute(cfg: Any, run_id: str, *, force: tuple[str, ...] = (), tracking_uri: str | None = None,
            console: Console, label: str = "run", progress: bool = True):
    """Run ``cfg`` as run ``run_id``; an existing run record means another attempt under the same MLflow parent."""
    from vitpipe.jobs.cli import stages_for
    from vitpipe.jobs.runner import run_pipeline
    from vitpipe.jobs.store import Store, exists

    store = Store(cfg.store)
    record = store.load_run(run_id) if exists(store.run_url(run_id)) else None
    uri = tracking_uri_for(cfg, tracking_uri) if cfg.tracking.enabled else None
    parent = attach_parent(cfg, record, uri, label) if record else None
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `vitpipe stop` / ray job stop send SIGTERM
    try:
        summary = run_pipeline(cfg, stages_for(cfg), force=force, tracking_uri=uri, console=console,
                               progress=progress, run_id=run_id, parent_tracker=parent)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary.ui_hint = redact("uri", summary.ui_hint or "")
    return summary


def _load_run(store: str | None, run_id: str) -> tuple[Any, dict]:
    from vitpipe.jobs.config import PipelineConfig
    from vitpipe.jobs.store import Store

    record = Store(store or os.environ.get("VITPIPE_STORE", "runs")).load_run(run_id)
    return from_dict(PipelineConfig, record["config"]), record


def register(app: typer.Typer, console: Console) -> None:  # noqa: C901 - one closure per verb, by design of typer
    """Add the cluster verbs to ``app``."""
    from vitpipe.jobs.cli import _fail, _print_summary, _setup_logging, build_config

    def guarded(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            _fail(str(e))

    def show(rep: cluster_status.JobReport, address: str) -> None:
        style = VERDICT_STYLE.get(rep.verdict, "white")
        console.print(f"job [bold]{rep.job_id}[/]: [{style}]{rep.verdict}[/] (Ray: {rep.ray_status}, run.json: "
                      f"{rep.run_status or 'not written yet'})", highlight=False, soft_wrap=True)
        if rep.reason:
            console.print(f"  reason: {rep.reason}", highlight=False, soft_wrap=True)
        if rep.stages:
            stages = ", ".join(f"{k}={v}" for k, v in rep.stages.items())
            console.print(f"  stages: {stages}", highlight=False, soft_wrap=True)
        if rep.run_id:
            console.print(f"  run: {rep.run_id} in {rep.store}", highlight=False, soft_wrap=True)
        link = cluster_mlflow.mlflow_link(os.environ.get("MLFLOW_TRACKING_URI") or rep.tracking_uri, rep.mlflow_run_id)
        if link:
            console.print(f"  MLflow: {link}", highlight=False, soft_wrap=True)
        if rep.diagnosis:
            console.print(f"  [bold red]diagnosis:[/] {rep.diagnosis}", highlight=False, soft_wrap=True)
        if rep.verdict in ("FAILED", "STOPPED") and rep.run_id:
            console.print(f"  resume with: vitpipe resume {rep.run_id} --store {rep.store}", highlight=False,
                          soft_wrap=True)

    address_opt = typer.Option(DEFAULT_ADDRESS, "--address", envvar=_ADDRESS_ENV, help="Ray job server URL.")

    @app.command()
    def submit(
        recipe: str = typer.Argument(..., help="Recipe name (see `vitpipe recipes`)."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override, e.g. --set pretrain.steps=100."),
        store: Optional[str] = typer.Option(None, help="Output root both the cluster and you can reach."),
        address: str = address_opt,
        python: Optional[str] = typer.Option(None, help="Entrypoint interpreter (default: this one for a local "
                                             "cluster, else `python` on the cluster image)."),
        tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
        env: list[str] = typer.Option([], "--env", help="Forward this env var (no secrets: the dashboard shows it)."),
        force: list[str] = typer.Option([], "--force", help="Rerun this stage even when cached."),
        entrypoint_cpus: float = typer.Option(0.0, help="CPUs reserved for the driver."),
        entrypoint_gpus: float = typer.Option(0.0, help="GPUs reserved for the driver."),
        follow: bool = typer.Option(False, "--follow", "-f", help="Stream the logs, then judge the job."),
    ) -> None:
        """Submit the pipeline as a Ray job and print how to follow it.

        Example: vitpipe submit demo --address http://127.0.0.1:8265 --store s3://bucket/runs --set pretrain.steps=500
        """
        def go() -> cluster.Submission:
            cfg = build_config(recipe, set_, store)
            opts = cluster.SubmitOptions(address=address, python=python, tracking_uri=tracking_uri, env=tuple(env),
                                         entrypoint_num_cpus=entrypoint_cpus, entrypoint_num_gpus=entrypoint_gpus,
                                         force=tuple(force))
            from vitpipe.jobs.cli import stages_for
            from vitpipe.jobs.graph import plan
            from vitpipe.jobs.store import Store

            plan(cfg, stages_for(cfg), Store(cfg.store), tuple(force))  # unknown --force stages fail here
            return cluster.submit(cfg, opts)

        sub = guarded(go)
        console.print(f"submitted job [bold]{sub.job_id}[/] (run {sub.run_id}, store {sub.store}) to {address}",
                      highlight=False, soft_wrap=True)
        console.print(f"  follow: vitpipe logs {sub.job_id} --follow --address {address}\n"
                      f"  status: vitpipe status {sub.job_id} --address {address}\n"
                      f"  stop:   vitpipe stop {sub.job_id} --address {address}", highlight=False, soft_wrap=True)
        if follow:
            _follow_and_judge(sub.job_id, address)

    def _follow_and_judge(job_id: str, address: str) -> None:
        client = guarded(cluster.connect, address)
        guarded(cluster.job_info, client, job_id)
        for chunk in cluster_status.follow_logs(client, job_id):
            console.out(chunk, end="", highlight=False)
        rep = cluster_status.wait(client, job_id, timeout_s=60)
        show(rep, address)
        raise typer.Exit(0 if rep.ok else 1)

    @app.command()
    def status(
        job: str = typer.Argument(..., help="Job (submission) id printed by `vitpipe submit`."),
        address: str = address_opt,
        pending_timeout: float = typer.Option(120.0, help="Seconds waiting for resources before a diagnosis."),
        wait: bool = typer.Option(False, "--wait", help="Block until the job ends; exit 0 only if it succeeded."),
    ) -> None:
        """A job's verdict from its Ray status and the stages' outputs (run.json, result.json).

        Example: vitpipe status vitpipe-20250101-120000-abc123 --wait
        Exit code: 0 succeeded or still going, 1 failed/stopped, 2 unknown job or no cluster.
        """
        from vitpipe.jobs.cluster_diagnose import PendingClock

        client = guarded(cluster.connect, address)
        clock = PendingClock()
        while True:
            rep = guarded(cluster_status.report, client, job)
            info = cluster.job_info(client, job)
            if rep.verdict == "PENDING":
                rep.diagnosis = cluster_diagnose.diagnose(address, info, pending_timeout)
            elif rep.verdict == "RUNNING":
                waiting = _pending_workers(address, info)
                if waiting and clock.waiting(time.monotonic()) >= pending_timeout:
                    rep.diagnosis = next(iter(waiting.values())) + f" (pending for over {pending_timeout:.0f}s)"
                elif waiting and not wait:
                    console.print(f"  note: {next(iter(waiting.values()))}", highlight=False, soft_wrap=True)
            if not wait or rep.ray_status in cluster.TERMINAL or rep.diagnosis:
                break
            time.sleep(2.0)
        show(rep, address)
        raise typer.Exit(0 if rep.verdict in ("SUCCEEDED", "RUNNING", "PENDING") and not rep.diagnosis else 1)

    @app.command()
    def logs(job: str = typer.Argument(..., help="Job id."), address: str = address_opt,
             follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends, then judge it.")
             ) -> None:
        """Print a job's driver logs.  Example: vitpipe logs vitpipe-20250101-120000-abc123 --follow"""
        if follow:
            _follow_and_judge(job, address)
        client = guarded(cluster.connect, address)
        guarded(cluster.job_info, client, job)
        console.out(client.get_job_logs(job), end="", highlight=False)

    @app.command()
    def stop(job: str = typer.Argument(..., help="Job id."), address: str = address_opt,
             timeout: float = typer.Option(90.0, help="Seconds to wait for the job to end.")) -> None:
        """Stop a job; its run record and MLflow runs end STOPPED/KILLED, never RUNNING.

        Example: vitpipe stop vitpipe-20250101-120000-abc123
        """
        client = guarded(cluster.connect, address)
        rep = guarded(cluster_status.stop, client, job, timeout)
        show(rep, address)

    @app.command("jobs")
    def jobs_(address: str = address_opt, limit: int = typer.Option(20, help="How many recent jobs.")) -> None:
        """Recent vitpipe jobs on a cluster with their verdicts and MLflow run links.

        Example: vitpipe jobs --address http://127.0.0.1:8265
        """
        client = guarded(cluster.connect, address)
        table = Table(title=f"vitpipe jobs at {address}")
        for col in ("job", "recipe", "verdict", "started", "run", "MLflow"):
            table.add_column(col, overflow="fold")
        for rep in cluster_status.list_reports(client, limit):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep.start_time)) if rep.start_time else ""
            link = cluster_mlflow.mlflow_link(os.environ.get("MLFLOW_TRACKING_URI") or rep.tracking_uri, rep.mlflow_run_id)
            style = VERDICT_STYLE.get(rep.verdict, "white")
            table.add_row(rep.job_id, rep.recipe, f"[{style}]{rep.verdict}[/]", started, rep.run_id or "", link)
        console.print(table)

    @app.command()
    def driver(job_file: str = typer.Argument(..., help="vitpipe_job.json written by `vitpipe submit`."),
               verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
        """The entrypoint of a submitted job: run a resolved config under its run id (a retry resumes it).

        Example (what `vitpipe submit` runs on the cluster): python -m vitpipe.jobs.cli driver vitpipe_job.json
        """
        _setup_logging(verbose)
        import vitpipe
        from vitpipe.jobs.config import PipelineConfig

        def go():
            with open(job_file) as f:
                job = json.load(f)
            cfg = from_dict(PipelineConfig, job["config"])
            console.print(f"vitpipe driver: run {job['run_id']} ({cfg.name}), code from "
                          f"{os.path.dirname(vitpipe.__file__)}", highlight=False, soft_wrap=True)
            return execute(cfg, job["run_id"], force=tuple(job.get("force", ())), tracking_uri=job.get("tracking_uri"),
                           console=console, label=f"job-{os.environ.get('RAY_JOB_SUBMISSION_ID', 'local')}",
                           progress=False)

        t0 = time.perf_counter()
        _print_summary(guarded(go), time.perf_counter() - t0)

    @app.command()
    def rerun(run_id: str = typer.Argument(..., help="Run id (see `vitpipe runs`)."),
              stage: str = typer.Argument(..., help="Stage to redo; the stages that read it are redone too."),
              store: Optional[str] = typer.Option(None, help="Store root (default $VITPIPE_STORE or ./runs)."),
              tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
              verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
        """Rerun one stage (and its dependents) of a run: new child runs under the run's MLflow parent.

        Example: vitpipe rerun 20250101-120000-abc123 finetune --store ./runs
        """
        _setup_logging(verbose)

        def go():
            cfg, _ = _load_run(store, run_id)
            if stage not in cfg.stages:
                raise ConfigError(f"unknown stage '{stage}' for run {run_id} (stages: {', '.join(cfg.stages)})")
            return execute(cfg, run_id, force=(stage,), tracking_uri=tracking_uri, console=console,
                           label=f"rerun-{stage}-{time.strftime('%Y%m%d-%H%M%S')}")

        t0 = time.perf_counter()
        _print_summary(guarded(go), time.perf_counter() - t0)

    @app.command()
    def resume(run_id: str = typer.Argument(..., help="Run id of an interrupted or failed run."),
               store: Optional[str] = typer.Option(None, help="Store root (default $VITPIPE_STORE or ./runs)."),
               tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
               verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
        """Continue a run: finished stages are reused, pretraining restarts from its last Ray Train checkpoint.

        Example: vitpipe resume 20250101-120000-abc123 --store s3://bucket/runs
        """
        _setup_logging(verbose)

        def go():
            cfg, record = _load_run(store, run_id)
            if record.get("status") == "FINISHED":
                console.print(f"run {run_id} already FINISHED; to redo a stage: vitpipe rerun {run_id} STAGE",
                              highlight=False, soft_wrap=True)
                raise typer.Exit(0)
            return execute(cfg, run_id, tracking_uri=tracking_uri, console=console,
                           label=f"resume-{time.strftime('%Y%m%d-%H%M%S')}")

        t0 = time.perf_counter()
        _print_summary(guarded(go), time.perf_counter() - t0)

    @app.command("plan")
    def plan_(recipe: str = typer.Argument(..., help="Recipe name."),
              set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override."),
              store: Optional[str] = typer.Option(None, help="Store whose cache the plan checks."),
              gpus: str = typer.Option("8xH100", help="Accelerators, COUNTxKIND (H100, H200, A100, A100-40GB)."),
              mfu: float = typer.Option(0.4, help="Assumed model-FLOPs utilisation (0-1]."),
              force: list[str] = typer.Option([], "--force", help="Plan as if this stage were forced.")) -> None:
        """The stage graph (cached / to run) and, per training stage, params, FLOPs, memory by ZeRO stage, time.

        Example: vitpipe plan jft-h14 --gpus 256xH100 --mfu 0.4
        """
        from vitpipe.jobs import planner

        def go():
            cfg = build_config(recipe, set_, store)
            return cfg, planner.plan_compute(cfg, planner.parse_gpus(gpus), mfu)

        cfg, est = guarded(go)
        items = guarded(planner.stage_plan, cfg, tuple(force))
        console.print(planner.render(cfg, items, est))
