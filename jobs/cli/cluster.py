"""Cluster verbs: submit the pipeline as a Ray job, follow and judge jobs (status, logs, stop, jobs), and
``driver``, the entrypoint a submitted job runs on the cluster."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

import typer
from rich.table import Table

from vitpipe.jobs.cluster import diagnose as cluster_diagnose
from vitpipe.jobs.cluster import links as cluster_links
from vitpipe.jobs.cluster import status as cluster_status
from vitpipe.jobs.cluster import submit as cluster
from vitpipe.jobs.cli.common import app, console, guarded, run_under_view, setup_logging
from vitpipe.jobs.config import build_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_ADDRESS_ENV = ["RAY_API_SERVER_ADDRESS"]
VERDICT_STYLE = {"SUCCEEDED": "green", "RUNNING": "yellow", "PENDING": "yellow", "FAILED": "red", "STOPPED": "red"}
address_opt = typer.Option(DEFAULT_ADDRESS, "--address", envvar=_ADDRESS_ENV, help="Ray job server URL.")


def show(rep: cluster_status.JobReport) -> None:
    """A job's verdict, reason, stages, run, MLflow link, diagnosis and how to resume it."""
    style = VERDICT_STYLE.get(rep.verdict, "white")
    sweep = rep.kind == "sweep"
    lines = [f"job [bold]{rep.job_id}[/]: [{style}]{rep.verdict}[/] (Ray: {rep.ray_status}, "
             f"{'sweep.json' if sweep else 'run.json'}: {rep.run_status or 'not written yet'})"]
    if rep.reason:
        lines.append(f"  reason: {rep.reason}")
    if rep.stages:
        lines.append(("  points: " if sweep else "  stages: ") + ", ".join(f"{k}={v}" for k, v in rep.stages.items()))
    if rep.run_id:
        lines.append(f"  {'sweep' if sweep else 'run'}: {rep.run_id} in {rep.store}")
    link = cluster_links.mlflow_link(os.environ.get("MLFLOW_TRACKING_URI") or rep.tracking_uri, rep.mlflow_run_id)
    if link:
        lines.append(f"  MLflow: {link}")
    if rep.diagnosis:
        lines.append(f"  [bold red]diagnosis:[/] {rep.diagnosis}")
    if rep.verdict in ("FAILED", "STOPPED") and rep.run_id:
        lines.append(f"  resume with: vitpipe sweep --resume {rep.run_id} --store {rep.store} --address <URL>"
                     if sweep else f"  resume with: vitpipe resume {rep.run_id} --store {rep.store}")
    for line in lines:
        console.print(line, highlight=False, soft_wrap=True)


def _pending_workers(address: str, info: Any) -> dict[str, str]:
    """``cluster_diagnose.pending_workers``, or {} when the state API cannot answer (a node just lost, a dashboard
    restarting): the diagnosis is a bonus, the verdict must still print."""
    try:
        return cluster_diagnose.pending_workers(address, info)
    except Exception as e:  # noqa: BLE001 - RayStateApiException, timeouts, connection errors alike
        logging.getLogger(__name__).warning("no placement diagnosis (state API: %s)", str(e).splitlines()[0][:200])
        return {}


def _follow_and_judge(job_id: str, address: str) -> None:
    client = guarded(cluster.connect, address)
    guarded(cluster.job_info, client, job_id)
    for chunk in cluster_status.follow_logs(client, job_id):
        console.out(chunk, end="", highlight=False)
    rep = cluster_status.wait(client, job_id, timeout_s=60)
    show(rep)
    raise typer.Exit(0 if rep.ok else 1)


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
    from vitpipe.jobs.core.store import Store
    from vitpipe.jobs.run.graph import plan
    from vitpipe.jobs.stages import stages_for

    def go() -> cluster.Submission:
        cfg = build_config(recipe, set_, store)
        opts = cluster.SubmitOptions(address=address, python=python, tracking_uri=tracking_uri, env=tuple(env),
                                     entrypoint_num_cpus=entrypoint_cpus, entrypoint_num_gpus=entrypoint_gpus,
                                     force=tuple(force))
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
    client = guarded(cluster.connect, address)
    clock = cluster_diagnose.PendingClock()
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
    show(rep)
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
    show(guarded(cluster_status.stop, client, job, timeout))


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
        link = cluster_links.mlflow_link(os.environ.get("MLFLOW_TRACKING_URI") or rep.tracking_uri, rep.mlflow_run_id)
        style = VERDICT_STYLE.get(rep.verdict, "white")
        table.add_row(rep.job_id, rep.recipe, f"[{style}]{rep.verdict}[/]", started, rep.run_id or "", link)
    console.print(table)


@app.command()
def driver(job_file: str = typer.Argument(..., help="vitpipe_job.json written by `vitpipe submit`."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The entrypoint of a submitted job: run a resolved config under its run id (a retry resumes it).

    Example (what `vitpipe submit` runs on the cluster): python -m vitpipe.jobs.cli driver vitpipe_job.json
    """
    setup_logging(verbose)
    import vitpipe
    from vitpipe.jobs.config import PipelineConfig
    from vitpipe.jobs.core.configtools import from_dict
    from vitpipe.jobs.run.runner import execute

    def go(view):
        with open(job_file) as f:
            job = json.load(f)
        cfg = from_dict(PipelineConfig, job["config"])
        console.print(f"vitpipe driver: run {job['run_id']} ({cfg.name}), code from "
                      f"{os.path.dirname(vitpipe.__file__)}", highlight=False, soft_wrap=True)
        return execute(cfg, job["run_id"], force=tuple(job.get("force", ())), tracking_uri=job.get("tracking_uri"),
                       console=console, label=f"job-{os.environ.get('RAY_JOB_SUBMISSION_ID', 'local')}",
                       progress=False, view=view)

    # The job's own log (`vitpipe logs`) is where a cluster run is read: it keeps everything, as --verbose does.
    run_under_view(go, True)
