"""The ``vitpipe`` command line: parsing and printing only; every verb calls into ``run``, ``config``, ``cluster``
or ``train.compute``. Verbs by audience: ``local`` (run, rerun, resume, recipes, config, models, runs, ingest,
dedup), ``cluster`` (submit, status, logs, stop, jobs, driver), ``plan``."""

from __future__ import annotations

import os
import sys

from vitpipe.jobs.cli import cluster, local, plan, sweep  # noqa: F401 - each module registers its verbs on `app`
from vitpipe.jobs.cli.common import app, console


def main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Registering the model re-reads its artifacts; MLflow's per-file download bars would interleave with ours.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Worker output goes to the run's log as it comes: Ray's de-duplication would hold lines back and print its
    # "[repeated Nx across cluster]" summaries later, after the run's log is closed.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from vitpipe.jobs.train.worker_env import keep_freed_memory_mapped

    keep_freed_memory_mapped()  # the driver embeds features (fewshot) and may fine-tune in-process
    try:
        app()
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "main"]
