"""Local verbs: run a recipe (or rerun / resume a stored run), inspect recipes, configs, models and runs, and the
data verbs (ingest, dedup)."""

from __future__ import annotations

import os
import time
from typing import Optional

import typer
from rich.table import Table

from vitpipe.jobs.cli.common import app, console, fail, guarded, print_table, run_under_view, setup_logging
from vitpipe.jobs.config import ResolvedConfig, build_config
from vitpipe.jobs.core.configtools import ConfigError


@app.command()
def run(
    recipe: str = typer.Argument("demo", help="Recipe name (see `vitpipe recipes`)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override, e.g. --set pretrain.lr=3e-4."),
    force: list[str] = typer.Option([], "--force", help="Rerun this stage (and what depends on it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stage plan and resolved config; run nothing."),
    store: Optional[str] = typer.Option(None, help="Output root (fsspec URL); default from the recipe (./runs)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: sqlite file in the store)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show everything the run logs (else: in its "
                                 "log file, <store>/runs/<run>/run.log)."),
) -> None:
    """Run the pipeline: ingest -> pretrain -> fewshot / finetune / analysis -> report.

    On a terminal: the stage plan, a live progress bar per running stage, the report. Piped: plain lines. The rest
    (Ray's, DeepSpeed's and MLflow's output) goes to the run's log; its path is printed.

    Example: vitpipe run demo --set pretrain.steps=100 --set finetune.lr_grid=0.003,0.01
    """
    setup_logging(verbose)
    from vitpipe.jobs.run.runner import run_pipeline
    from vitpipe.jobs.stages import stages_for

    def go(view):
        cfg = build_config(recipe, set_, store)
        return run_pipeline(ResolvedConfig.of(cfg), stages_for(cfg), force=tuple(force), dry_run=dry_run,
                            tracking_uri=tracking_uri, view=view)

    run_under_view(go, verbose, summary=not dry_run)


@app.command()
def rerun(run_id: str = typer.Argument(..., help="Run id (see `vitpipe runs`)."),
          stage: str = typer.Argument(..., help="Stage to redo; the stages that read it are redone too."),
          store: Optional[str] = typer.Option(None, help="Store root (default $VITPIPE_STORE or ./runs)."),
          tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
          verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Rerun one stage (and its dependents) of a run: new child runs under the run's MLflow parent.

    Example: vitpipe rerun 20250101-120000-abc123 finetune --store ./runs
    """
    setup_logging(verbose)
    from vitpipe.jobs.run.runner import execute, load_run

    def go(view):
        cfg, _ = load_run(_store(store), run_id)
        if stage not in cfg.stages:
            raise ConfigError(f"unknown stage '{stage}' for run {run_id} (stages: {', '.join(cfg.stages)})")
        return execute(cfg, run_id, force=(stage,), tracking_uri=tracking_uri, console=console,
                       label=f"rerun-{stage}-{time.strftime('%Y%m%d-%H%M%S')}", view=view)

    run_under_view(go, verbose)


@app.command()
def resume(run_id: str = typer.Argument(..., help="Run id of an interrupted or failed run."),
           store: Optional[str] = typer.Option(None, help="Store root (default $VITPIPE_STORE or ./runs)."),
           tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI"),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Continue a run: finished stages are reused, pretraining restarts from its last Ray Train checkpoint.

    Example: vitpipe resume 20250101-120000-abc123 --store s3://bucket/runs
    """
    setup_logging(verbose)
    from vitpipe.jobs.run.runner import execute, load_run

    def go(view):
        cfg, record = load_run(_store(store), run_id)
        if record.get("status") == "FINISHED":
            console.print(f"run {run_id} already FINISHED; to redo a stage: vitpipe rerun {run_id} STAGE",
                          highlight=False, soft_wrap=True)
            raise typer.Exit(0)
        return execute(cfg, run_id, tracking_uri=tracking_uri, console=console,
                       label=f"resume-{time.strftime('%Y%m%d-%H%M%S')}", view=view)

    run_under_view(go, verbose)


def _store(store: str | None) -> str:
    return store or os.environ.get("VITPIPE_STORE", "runs")


@app.command()
def recipes() -> None:
    """List the named recipes.  Example: vitpipe recipes"""
    from vitpipe.jobs.config import RECIPES

    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for name, fn in sorted(RECIPES.items()):
        table.add_row(name, (fn.__doc__ or "").strip().split("\n")[0])
    print_table(table)


@app.command("config")
def show_config(recipe: str = typer.Argument("demo"),
                set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override.")) -> None:
    """Print a recipe's resolved config as JSON (secrets redacted).  Example: vitpipe config demo --set model.depth=8"""
    cfg = guarded(build_config, recipe, set_)
    console.print_json(ResolvedConfig.of(cfg).json())


@app.command()
def models(img_size: int = typer.Option(224, help="Resolution for the FLOPs column.")) -> None:
    """List the ViT variants with parameters and GFLOPs.  Example: vitpipe models --img-size 384"""
    from vitpipe.models import CANONICAL_NAMES, variant_table

    if img_size <= 0:
        fail(f"--img-size must be positive, got {img_size}")
    rows = variant_table(img_size=img_size)
    if not rows:
        fail(f"no variant's patch size divides {img_size}px")
    table = Table(title=f"ViT variants at {img_size}px (1000-class head)")
    for col, v in rows[0].items():
        numeric = isinstance(v, (int, float))
        table.add_column(str(col), no_wrap=True, min_width=len(str(col)), justify="right" if numeric else "left")
    for r in rows:
        table.add_row(*[f"{v:,}" if isinstance(v, int) else (f"{v:.2f}" if isinstance(v, float) else str(v))
                        for v in r.values()])
    print_table(table)
    skipped = [n for n in CANONICAL_NAMES if n not in {r["name"] for r in rows}]
    if skipped:
        console.print(f"not at {img_size}px (the patch size does not divide it): {', '.join(skipped)}")


@app.command()
def runs(store: str = typer.Option("runs", help="Store root.")) -> None:
    """List the runs recorded in a store.  Example: vitpipe runs --store ./runs"""
    from vitpipe.jobs.core.store import Store

    table = Table(title=f"runs in {store}")
    for col in ("run", "recipe", "status", "started", "stages"):
        table.add_column(col)
    for r in Store(store).list_runs():
        stages = ", ".join(f"{k}:{v.get('status')}" for k, v in r.get("stages", {}).items())
        table.add_row(r["run_id"], r.get("recipe", ""), r.get("status", ""), r.get("started", ""), stages)
    print_table(table)


@app.command()
def ingest(
    source: str = typer.Argument(..., help="Image folder (<class>/* or <split>/<class>/*), tar/WebDataset, or list file."),
    dest: str = typer.Argument(..., help="Output folder for shards + manifest.json (any fsspec URL)."),
    split: Optional[str] = typer.Option(None, help="Sub-folder of an image folder to ingest (e.g. train)."),
    resize_short: Optional[int] = typer.Option(None, help="Shrink images whose short side exceeds this."),
    keep_original: bool = typer.Option(False, help="With --resize-short, also keep the source bytes."),
    quality: int = typer.Option(95, help="JPEG quality for re-encoded images."),
    shard_samples: Optional[int] = typer.Option(5000, help="Samples per shard (0: no limit)."),
    shard_mb: Optional[float] = typer.Option(None, help="Target shard size in MB."),
    max_bad_fraction: float = typer.Option(0.01, help="Stop when more than this fraction of items is bad."),
    workers: int = typer.Option(2, help="Local processes writing shards."),
    use_ray: bool = typer.Option(False, "--ray", help="Fan out as Ray tasks (RAY_ADDRESS or a local head)."),
) -> None:
    """Ingest images into WebDataset shards + manifest.  Example: vitpipe ingest ../shared/data/cifar10 runs/c10 --split train"""
    setup_logging(True)
    from vitpipe.pipeline import IngestConfig, IngestError
    from vitpipe.pipeline import ingest as local_ingest

    try:
        cfg = IngestConfig(split=split, resize_short=resize_short, keep_original=keep_original, quality=quality,
                           shard_max_samples=shard_samples or None,
                           shard_max_bytes=int(shard_mb * 2**20) if shard_mb else None,
                           max_bad_fraction=max_bad_fraction, num_workers=workers)
        if use_ray:
            from vitpipe.jobs.stages.ingest import ray_ingest

            manifest = ray_ingest(source, dest, cfg)
        else:
            manifest = local_ingest(source, dest, cfg, progress=console.is_terminal)  # no bars when piped
    except (ValueError, FileNotFoundError, IngestError) as e:
        fail(str(e))
    console.print(f"{manifest.num_samples} samples in {len(manifest.shards)} shards, {len(manifest.classes)} classes, "
                  f"bad: {dict(manifest.bad) or 'none'} -> {dest}/manifest.json", soft_wrap=True)


@app.command()
def dedup(
    manifest: str = typer.Argument(..., help="Pretraining manifest.json URL."),
    tasks: list[str] = typer.Argument(..., help="Downstream tasks: name=<folder with train/test> or digits."),
    out: str = typer.Option(..., help="Where to write the report / exclusion list (JSON)."),
    max_distance: int = typer.Option(4, help="Max Hamming distance of 64-bit perceptual hashes."),
) -> None:
    """Find pretraining images that near-duplicate downstream test images; write an exclusion list for
    pretrain.stream.exclude.  Example: vitpipe dedup runs/c10/manifest.json cifar10=../shared/data/cifar10 --out dd.json"""
    setup_logging(True)
    from vitpipe.jobs.evals.taskspec import make_task
    from vitpipe.pipeline.dedup import dedup as find_dups

    try:
        report = find_dups(manifest, [make_task(t) for t in tasks], max_distance=max_distance)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    report.save(out)
    console.print(f"{report.num_excluded} of {report.num_pretrain} pretraining samples near-duplicate "
                  f"{len(report.matches)} test pairs; exclusion list -> {out} "
                  f"(use: --set pretrain.stream.exclude={out})", soft_wrap=True)


