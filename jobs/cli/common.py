"""What every verb of the ``vitpipe`` CLI shares: the typer app, the console, one-line user errors, logging setup,
running a pipeline under a view (``jobs.run.view``: live on a terminal, plain lines when piped, the rest in the
run's log) and the run summary."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from vitpipe.jobs.cluster.submit import ClusterError
from vitpipe.jobs.core.configtools import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ViT pretraining and evaluation pipeline: shards -> DeepSpeed/Ray -> few-shot/fine-tune -> MLflow.")
console = Console()

# Errors a user causes (bad key, missing folder, unknown recipe, run or job, no cluster): one line, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ClusterError)
T = TypeVar("T")


def print_table(table: Table) -> None:
    """Print a table whole: piped or redirected output is not cut to an 80-column default."""
    (console if console.is_terminal else Console(file=console.file, width=200)).print(table)


class _ConsoleFilter(logging.Filter):
    """Without ``--verbose`` the console shows warnings and errors only, and while a run's log is open only
    vitpipe's own: everything else is in the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        from vitpipe.jobs.run.view import log_is_open

        if record.levelno < logging.WARNING:
            return False
        return record.name == "vitpipe" or record.name.startswith("vitpipe.") or not log_is_open()


def setup_logging(verbose: bool) -> None:
    """INFO and up reach the handlers (the run's log file takes them all); the console shows them all with
    ``verbose``, else what ``_ConsoleFilter`` lets through."""
    handler = RichHandler(console=console, show_path=False, markup=False)
    if not verbose:
        handler.addFilter(_ConsoleFilter())
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("alembic", "mlflow", "urllib3", "filelock", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(msg: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def guarded(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``; a user error becomes one ``error:`` line and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except USER_ERRORS as e:
        fail(str(e))


def run_under_view(go: Callable[[Any], Any], verbose: bool, *, summary: bool = True) -> Any:
    """``go(view)`` (a pipeline run) under a :class:`~vitpipe.jobs.run.view.RunView` on the console, then the
    summary. A failed stage was reported by the view (its one line, the log path): exit 1 (2 for a user's error,
    e.g. a limit above the data), its traceback in the log. A user error before any stage ran: one ``error:``
    line. Anything else is a bug outside the stages and keeps its traceback."""
    from vitpipe.jobs.run.view import RunView

    view = RunView(console, verbose=verbose)
    t0 = time.perf_counter()
    try:
        try:
            result = go(view)
        except typer.Exit:
            raise
        except USER_ERRORS as e:
            if view.failure is None:
                fail(str(e))
            raise typer.Exit(2) from None
        except Exception:
            if view.failure is None:
                raise
            raise typer.Exit(1) from None
        if summary and result is not None:
            print_summary(result, time.perf_counter() - t0, log_path=view.log_path)
        return result
    finally:
        view.close()


def print_summary(summary: Any, seconds: float, log_path: str | None = None) -> None:
    """The report (if the run has one), a table of stages, how to open MLflow, and where the run's log is."""
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
    if log_path:
        console.print(f"log: {log_path}", highlight=False, soft_wrap=True)
