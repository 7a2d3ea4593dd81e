"""``vitpipe`` command line: run the pipeline or one stage, inspect recipes, models and runs."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from vitpipe.jobs.configtools import ConfigError, apply_overrides, to_dict

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ViT pretraining and evaluation pipeline: shards -> DeepSpeed/Ray -> few-shot/fine-tune -> MLflow.")
console = Console()


def print_table(table: Table) -> None:
    """Print a table whole: piped or redirected output is not cut to an 80-column default."""
    (console if console.is_terminal else Console(width=200)).print(table)


# Errors a user causes (bad key, missing folder, unknown recipe or run): one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)], force=True)
    logging.getLogger("vitpipe").setLevel(logging.INFO)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def build_config(recipe: str, overrides: list[str], store: Optional[str] = None):
    """Recipe + ``--set`` overrides (+ ``--store``), relative paths made absolute."""
    from vitpipe.jobs.config import resolve_paths
    from vitpipe.jobs.recipes import get_recipe

    cfg = get_recipe(recipe)
    if store:
        overrides = [*overrides, f"store={store}"]
    cfg = apply_overrides(cfg, overrides)
    return resolve_paths(cfg)


def stages_for(cfg):
    from vitpipe.jobs.stages import STAGES

    return [STAGES[name]() for name in cfg.stages]


@app.command()
def run(
    recipe: str = typer.Argument("demo", help="Recipe name (see `vitpipe recipes`)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override, e.g. --set pretrain.lr=3e-4."),
    force: list[str] = typer.Option([], "--force", help="Rerun this stage (and what depends on it)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the stage plan and resolved config; run nothing."),
    store: Optional[str] = typer.Option(None, help="Output root (fsspec URL); default from the recipe (./runs)."),
    tracking_uri: Optional[str] = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                                               help="MLflow tracking URI (default: sqlite file in the store)."),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the pipeline: ingest -> pretrain -> fewshot / finetune / analysis -> report.

    Example: vitpipe run demo --set pretrain.steps=100 --set finetune.lr_grid=0.003,0.01
    """
    _setup_logging(verbose)
    from vitpipe.jobs.runner import run_pipeline

    try:
        cfg = build_config(recipe, set_, store)
        t0 = time.perf_counter()
        summary = run_pipeline(cfg, stages_for(cfg), force=tuple(force), dry_run=dry_run,
                               tracking_uri=tracking_uri, console=console)
    except USER_ERRORS as e:
        _fail(str(e))
        return
    if dry_run:
        return
    _print_summary(summary, time.perf_counter() - t0)


def _print_summary(summary, seconds: float) -> None:
    rep = summary.results.get("report")
    if rep:
        console.print(rep.info.get("markdown", ""), soft_wrap=True, markup=False)
    table = Table(title=f"run {summary.run_id} — {summary.status} in {seconds:.0f}s")
    for col in ("stage", "status", "seconds", "output"):
        table.add_column(col)
    for name, res in summary.results.items():
        table.add_row(name, summary.statuses.get(name, ""), f"{res.seconds:.1f}", res.url)
    print_table(table)
    if summary.ui_hint:
        console.print(f"MLflow: [bold]{summary.ui_hint}[/]  (parent run {summary.mlflow_run_id})")


@app.command()
def recipes() -> None:
    """List the named recipes.  Example: vitpipe recipes"""
    from vitpipe.jobs.recipes import RECIPES

    table = Table(title="recipes")
    table.add_column("name")
    table.add_column("description")
    for name, fn in sorted(RECIPES.items()):
        table.add_row(name, (fn.__doc__ or "").strip().split("\n")[0])
    print_table(table)


@app.command("config")
def show_config(recipe: str = typer.Argument("demo"),
                set_: list[str] = typer.Option([], "--set", "-s", help="Dotted override.")) -> None:
    """Print a recipe's resolved config as JSON.  Example: vitpipe config demo --set model.depth=8"""
    try:
        cfg = build_config(recipe, set_)
    except USER_ERRORS as e:
        _fail(str(e))
        return
    from vitpipe.jobs.tracking import redact_tree

    console.print_json(data=redact_tree(to_dict(cfg)))


@app.command()
def models(img_size: int = typer.Option(224, help="Resolution for the FLOPs column.")) -> None:
    """List the ViT variants with parameters and GFLOPs.  Example: vitpipe models --img-size 384"""
    from vitpipe.models import CANONICAL_NAMES, variant_table

    if img_size <= 0:
        _fail(f"--img-size must be positive, got {img_size}")
    rows = variant_table(img_size=img_size)
    if not rows:
        _fail(f"no variant's patch size divides {img_size}px")
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
    from vitpipe.jobs.store import Store

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
    _setup_logging(True)
    from vitpipe.pipeline import IngestConfig, IngestError
    from vitpipe.pipeline import ingest as local_ingest

    try:
        cfg = IngestConfig(split=split, resize_short=resize_short, keep_original=keep_original, quality=quality,
                           shard_max_samples=shard_samples or None,
                           shard_max_bytes=int(shard_mb * 2**20) if shard_mb else None,
                           max_bad_fraction=max_bad_fraction, num_workers=workers)
        if use_ray:
            from vitpipe.jobs.data_ops import ray_ingest

            manifest = ray_ingest(source, dest, cfg)
        else:
            manifest = local_ingest(source, dest, cfg, progress=True)
    except (ValueError, FileNotFoundError, IngestError) as e:
        _fail(str(e))
        return
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
    _setup_logging(True)
    from vitpipe.jobs.tasks import make_task
    from vitpipe.pipeline.dedup import dedup as find_dups

    try:
        report = find_dups(manifest, [make_task(t) for t in tasks], max_distance=max_distance)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        return
    report.save(out)
    console.print(f"{report.num_excluded} of {report.num_pretrain} pretraining samples near-duplicate "
                  f"{len(report.matches)} test pairs; exclusion list -> {out} "
                  f"(use: --set pretrain.stream.exclude={out})", soft_wrap=True)


def _register_extensions() -> None:
    """Cluster verbs (submit/status/logs/stop/jobs/plan) live in their own module."""
    try:
        from vitpipe.jobs.cli_cluster import register
    except ImportError as e:  # pragma: no cover - only while the module is absent
        if "cli_cluster" not in str(e):
            raise
        return
    register(app, console)


_register_extensions()


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Registering the model re-reads its artifacts; MLflow's per-file download bars would interleave with ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


if __name__ == "__main__":
    main()
