"""``vitpipe plan``: a recipe's stage graph (cached / stale / to run) and what its training stages cost."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Group

from vitpipe.jobs.cli.common import app, console, guarded
from vitpipe.jobs.config import build_config


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
    from vitpipe.jobs.run.planning import plan_table, stage_plan
    from vitpipe.jobs.train.compute import compute_tables, parse_gpus, plan_compute

    def go():
        cfg = build_config(recipe, set_, store)
        return cfg, plan_compute(cfg, parse_gpus(gpus), mfu)

    cfg, est = guarded(go)
    items = guarded(stage_plan, cfg, tuple(force))
    console.print(Group(plan_table(items, cfg, title=f"{cfg.name}: stage plan (store {cfg.store})"),
                        *compute_tables(est)))
