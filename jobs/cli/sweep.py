"""The ``sweep`` verb: a grid of pipeline runs as one command (here, or submitted to a cluster), and
``sweep-driver``, the entrypoint a submitted sweep runs on the cluster."""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import typer

from vitpipe.jobs.cluster import submit as cluster
from vitpipe.jobs.cli.common import app, console, fail, guarded, setup_logging
from vitpipe.jobs.core.configtools import ConfigError


@app.command()
def sweep(
    recipe: Optional[str] = typer.Argument(None, help="Recipe name (see `vitpipe recipes`); not with --resume."),
    grid: list[str] = typer.Option([], "--grid", "-g", help="Axis KEY=V1,V2,...; several --grid make a product; "
                                   "+KEY=... moves with the previous axis. Default: the recipe's own grid."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override for every point."),
    store: Optional[str] = typer.Option(None, help="Output root (fsspec URL); default from the recipe (./runs)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: sqlite file in the store)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="One line per point: coordinates, each stage's cache "
                                 "status. Runs nothing."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Sweep id: rerun the points that did not finish, "
                                         "reusing every finished stage."),
    concurrency: Optional[int] = typer.Option(None, "--concurrency", help="Points at once (default: 1 on this "
                                              "machine, as many as the cluster's resources hold on a cluster)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray job server URL: submit the sweep there "
                                          "as one Ray job instead of running it here."),
    python: Optional[str] = typer.Option(None, help="With --address: the job's interpreter."),
    env: list[str] = typer.Option([], "--env", help="With --address: forward this env var (no secrets)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a grid of pipeline runs as one sweep: one MLflow sweep run, each point's run nested under it, shared
    stages run once, scaling figures + a table of every point at the end.

    Example: vitpipe sweep tiny --grid model=mu/4,Ti/4 --grid data.limit=100,200 --set pretrain.steps=20
    """
    setup_logging(verbose)
    from vitpipe.jobs.run import sweep as sw_mod

    if resume and (recipe or grid):
        fail("--resume SWEEP continues a stored sweep: give no RECIPE or --grid with it")
    if not resume and not recipe:
        fail("give a RECIPE (or --resume SWEEP)")
    if concurrency is not None and concurrency < 1:
        fail(f"--concurrency must be >= 1, got {concurrency}")

    def build() -> sw_mod.Sweep:
        if resume:
            return sw_mod.load_sweep(store or os.environ.get("VITPIPE_STORE", "runs"), resume)
        from vitpipe.jobs.config import build_config

        axes = list(grid) or list(sw_mod.default_grid(recipe))
        return sw_mod.new_sweep(recipe, build_config(recipe, set_, store), axes, set_)

    sw = guarded(build)
    if resume and all(p.status == sw_mod.DONE for p in sw.points):
        console.print(f"sweep {sw.sweep_id}: every point FINISHED already; nothing to resume", highlight=False)
        return
    if dry_run:
        for line in guarded(sw_mod.dry_run_lines, [p for p in sw.points if p.status != sw_mod.DONE]):
            console.print(line, highlight=False, soft_wrap=True, markup=False)
        return
    if address:
        _submit(sw, address, python, tracking_uri, env, bool(resume))
        return
    from vitpipe.jobs.run.sweep_exec import run_sweep

    t0 = time.perf_counter()
    result = guarded(run_sweep, sw, tracking_uri=tracking_uri, console=console, concurrency=concurrency)
    _summary(result, time.perf_counter() - t0)


def _summary(sw, seconds: float) -> None:
    import fsspec

    report = sw.report.get("sweep_report.md")
    if report:
        with fsspec.open(report, "r") as f:
            console.print(f.read(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"sweep {sw.sweep_id}: {sw.status} in {seconds:.0f}s; record {sw.url}"
                  + (f"; MLflow sweep run {sw.mlflow_run_id} at {sw.tracking_uri}" if sw.mlflow_run_id else ""),
                  highlight=False, soft_wrap=True)
    if sw.status != "FINISHED":
        raise typer.Exit(1)


def _submit(sw, address: str, python: str | None, tracking_uri: str | None, env: list[str], resume: bool) -> None:
    from vitpipe.jobs.core.configtools import to_dict

    job = ({"resume": sw.sweep_id, "store": sw.store.root} if resume else
           {"sweep_id": sw.sweep_id, "recipe": sw.recipe, "grid": sw.grid, "sets": sw.sets,
            "config": to_dict(sw.base)})
    opts = cluster.SubmitOptions(address=address, python=python, tracking_uri=tracking_uri, env=tuple(env))
    sub = guarded(cluster.submit_sweep, job, sw.base, opts)
    console.print(f"submitted sweep [bold]{sw.sweep_id}[/] ({len(sw.points)} points) as job [bold]{sub.job_id}"
                  f"[/] to {address}", highlight=False, soft_wrap=True)
    console.print(f"  follow: vitpipe logs {sub.job_id} --follow --address {address}\n"
                  f"  resume: vitpipe sweep --resume {sw.sweep_id} --store {sub.store} --address {address}",
                  highlight=False, soft_wrap=True)


@app.command("sweep-driver", hidden=True)
def sweep_driver(job_file: str = typer.Argument(..., help=f"{cluster.SWEEP_JOB_FILE} written by `vitpipe sweep "
                                                "--address`."),
                 verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """The entrypoint of a submitted sweep: run (or resume) it on the cluster."""
    setup_logging(verbose)
    from vitpipe.jobs.config import PipelineConfig
    from vitpipe.jobs.core.configtools import from_dict
    from vitpipe.jobs.run import sweep as sw_mod
    from vitpipe.jobs.run.sweep_exec import run_sweep

    def go():
        with open(job_file) as f:
            job = json.load(f)
        if "resume" in job:
            sw = sw_mod.load_sweep(job["store"], job["resume"])
        else:
            base = from_dict(PipelineConfig, job["config"])
            sw = sw_mod.new_sweep(job["recipe"], base, job["grid"], job.get("sets", ()), sweep_id=job["sweep_id"])
        if not sw.points:
            raise ConfigError(f"sweep {sw.sweep_id} has no points")
        return run_sweep(sw, tracking_uri=job.get("tracking_uri"), console=console)

    t0 = time.perf_counter()
    _summary(guarded(go), time.perf_counter() - t0)
