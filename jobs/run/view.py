"""What a run shows a person, and where everything else goes.

A :class:`RunView` is the runner's one way to the console. On a terminal it is one live view: the stage plan, a
progress bar per running stage (pretraining's fed from rank 0, see ``vitpipe.jobs.train.progress``) and, at the
end, the report. Piped or in CI it prints plain lines instead: each stage's start and end, and its progress at
most every ``every_s`` seconds (``$VITPIPE_PROGRESS_EVERY_S``, default 30), never a carriage return.

Everything else goes to the run's log file, ``<store>/runs/<run_id>/run.log`` (a local copy uploaded there at the
end for a remote store): this process's logging, whatever is printed to stdout/stderr while the run is open (Ray's
worker output, which Ray forwards to the driver, library prints and warnings). ``verbose`` shows all of it on the
console as well. A stage that fails is reported first as one line (stage, rank, error; :func:`failure_line`)
and the path of the log, which holds the traceback.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, TextIO

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from vitpipe.jobs.core.secrets import redact_text
from vitpipe.jobs.train.progress import StageProgress

__all__ = ["EVERY_ENV", "RunView", "failure_line", "fmt_seconds", "log_is_open", "make_view", "run_log_path"]

log = logging.getLogger(__name__)

EVERY_ENV = "VITPIPE_PROGRESS_EVERY_S"
"""Seconds between two progress lines of one stage in piped output (default 30)."""
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Errors a rank raises because another rank died first (its peer closed the connection, a collective timed out)
_COLLATERAL = re.compile(r"connection closed by peer|connection reset|gloo|nccl|timed? ?out|broken pipe", re.I)
_OPEN: list[Any] = []  # the captures (run logs) open in this process


def log_is_open() -> bool:
    """Whether a run's log is open in this process (then the console keeps to the view)."""
    return bool(_OPEN)


def fmt_seconds(s: float | None) -> str:
    """``4m10s``, ``1h02m``, ``12s``; ``?`` for None."""
    if s is None or s != s or s < 0:
        return "?"
    s = int(round(s))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[0] if text else ""
    msg = msg if len(msg) <= 400 else msg[:397] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _unwrap(e: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (a task error, Ray Train's controller error)."""
    for _ in range(5):
        if hasattr(e, "as_instanceof_cause") and type(e).__name__.startswith("RayTaskError"):
            e = e.as_instanceof_cause()
            cause = getattr(e, "cause", None)
            if isinstance(cause, BaseException):
                e = cause
        elif isinstance(getattr(e, "controller_failure", None), BaseException):
            e = e.controller_failure
        else:
            break
    return e


def failure_line(stage: str, e: BaseException) -> str:
    """The one line that matters of a stage's failure: which stage, which rank(s) of a Ray Train worker group,
    what broke (the first line of the error). Of several failing ranks the first whose error is not collateral
    (a peer's lost connection or a timed-out collective) is named."""
    if isinstance(e, KeyboardInterrupt):
        return f"{stage} interrupted" + (f" ({e})" if str(e) else "")
    e = _unwrap(e)
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        ranks = sorted(failures)
        own = [r for r in ranks if not _COLLATERAL.search(str(failures[r]))] or ranks
        first = own[0]
        err = _first_line(_unwrap(failures[first]))
        same = [r for r in ranks if _first_line(_unwrap(failures[r])) == err]
        where = f"rank {first}" if len(same) == 1 else "ranks " + ", ".join(map(str, same))
        more = f" ({len(ranks) - len(same)} other rank(s) failed too)" if len(ranks) > len(same) else ""
        return f"{stage} failed on {where}: {err}{more}"
    return f"{stage} failed: {_first_line(e)}"


def run_log_path(store_root: str, run_id: str) -> tuple[str, str | None]:
    """(local path of the run's log, URL to upload it to at the end or None): ``<store>/runs/<run_id>/run.log``
    for a local store; for a remote one a local file under the temp folder, uploaded there when the run ends."""
    from vitpipe.jobs.core.store import local_path

    local = local_path(store_root)
    if local is not None:
        return os.path.join(local, "runs", run_id, "run.log"), None
    return (os.path.join(tempfile.gettempdir(), "vitpipe-runs", run_id, "run.log"),
            f"{store_root.rstrip('/')}/runs/{run_id}/run.log")


# ------------------------------------------------------------------------------------------------ log capture
class _Capture:
    """The run's log file: a logging handler on the root logger (and on loggers that do not propagate to it), and
    ``sys.stdout``/``sys.stderr`` replaced by line writers into the file while the run is open."""

    def __init__(self, path: str, echo: Any = None):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.path, self.echo = path, echo
        self.file: TextIO | None = open(path, "a", encoding="utf-8", buffering=1)
        self.lock = threading.RLock()
        self.saved = (sys.stdout, sys.stderr)
        self.handler = logging.StreamHandler(_FileOnly(self))
        self.handler.setFormatter(logging.Formatter(LOG_FORMAT))
        self.handler.setLevel(logging.INFO)
        self.loggers = [logging.getLogger()] + [
            lg for lg in logging.root.manager.loggerDict.values()
            if isinstance(lg, logging.Logger) and not lg.propagate and lg.handlers]
        for lg in self.loggers:
            lg.addHandler(self.handler)
        sys.stdout = _Stream(self, self.saved[0])  # type: ignore[assignment]
        sys.stderr = _Stream(self, self.saved[1])  # type: ignore[assignment]
        _OPEN.append(self)

    def write(self, text: str) -> None:
        """``text`` into the file: ANSI colours and carriage-return redraws removed, credentials redacted (a worker's
        error may quote a URL with a password)."""
        with self.lock:
            if self.file is None:
                return
            text = redact_text(_ANSI.sub("", text))
            if "\r" in text:  # a redrawn bar: keep what it finally said
                text = "\n".join(part.rsplit("\r", 1)[-1] for part in text.split("\n"))
            self.file.write(text)

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        for lg in self.loggers:
            lg.removeHandler(self.handler)
        with self.lock:
            if isinstance(sys.stdout, _Stream) and sys.stdout.capture is self:
                sys.stdout = self.saved[0]
            if isinstance(sys.stderr, _Stream) and sys.stderr.capture is self:
                sys.stderr = self.saved[1]
            if self.file is not None:
                self.file.close()
                self.file = None


class _FileOnly:
    """Stream for the logging handler: the file, never the console."""

    def __init__(self, capture: _Capture):
        self.capture = capture

    def write(self, text: str) -> None:
        self.capture.write(text)

    def flush(self) -> None:
        pass


class _Stream:
    """A ``sys.stdout``/``sys.stderr`` stand-in: whole lines into the log (and, verbose, onto the console). Once
    the capture is closed (a handler that kept this object), writes go to the stream it replaced."""

    def __init__(self, capture: _Capture, original: TextIO):
        self.capture, self.original = capture, original
        self._buf = ""

    def write(self, text: str) -> int:
        if self.capture.file is None:
            return self.original.write(text)
        with self.capture.lock:
            self._buf += text
            if "\n" in self._buf:
                lines, self._buf = self._buf.rsplit("\n", 1)
                self.capture.write(lines + "\n")
                if self.capture.echo is not None:
                    for line in lines.split("\n"):
                        self.capture.echo(line)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self) -> str:
        return "utf-8"

    def fileno(self) -> int:  # faulthandler & co. want a descriptor: the original's
        return self.original.fileno()


# ------------------------------------------------------------------------------------------------ the view
class _EtaColumn(ProgressColumn):
    """The stage's own time-left estimate when it gives one (pretraining does), else rich's from the rate."""

    def render(self, task: Task) -> Text:
        eta = task.fields.get("eta_s")
        if eta is None and task.total is not None and not task.finished:
            eta = task.time_remaining
        return Text(f"eta {fmt_seconds(eta)}" if eta is not None and not task.finished else "", style="cyan")


class _StageBar(StageProgress):
    """A running stage's progress in the view (thread-safe: updates come from stage and feed threads)."""

    def __init__(self, view: RunView, name: str):
        self.view, self.name = view, name
        self.completed: float = 0.0
        self.total: float | None = None
        self.unit, self.info, self.eta_s = "", "", None
        self.started = time.monotonic()
        self.last_line = float("-inf")
        self.printed_final = False
        self.task_id: Any = None

    def update(self, *, completed=None, total=None, advance=None, info=None, unit=None, eta_s=None) -> None:
        self.view._update(self, completed=completed, total=total, advance=advance, info=info, unit=unit,
                          eta_s=eta_s)

    def count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        if self.total:
            return f"{self.completed:,.0f}/{self.total:,.0f}{unit} ({100 * self.completed / self.total:.0f}%)"
        return f"{self.completed:,.0f}{unit}" if self.completed else ""


class RunView:
    """The console side of a run (module docstring). ``live``: one live view (default: when the console is a
    terminal); else plain lines, a stage's progress at most every ``every_s`` seconds."""

    def __init__(self, console: Console, *, verbose: bool = False, live: bool | None = None,
                 every_s: float | None = None):
        self.console, self.verbose = console, verbose
        self.live = console.is_terminal if live is None else live
        self.every_s = float(os.environ.get(EVERY_ENV, "30")) if every_s is None else every_s
        self.log_path: str | None = None
        self.failure: str | None = None
        """The one-line cause of the failed stage, once one failed."""
        self._upload: str | None = None
        self._capture: _Capture | None = None
        self._saved_file: Any = None
        self._lock = threading.RLock()
        self._bars: dict[str, _StageBar] = {}
        self._progress: Progress | None = None

    # -- printing
    def print(self, *things: RenderableType | str, **kwargs: Any) -> None:
        """Onto the console (above the live bars when they run)."""
        kwargs.setdefault("soft_wrap", True)
        with self._lock:
            self.console.print(*things, **kwargs)

    def _line(self, text: str, style: str | None = None) -> None:
        self.print(Text(text, style=style or ""), highlight=False)

    def plan(self, table: RenderableType) -> None:
        self.print(table)

    # -- the log file
    def open_log(self, path: str, *, upload_to: str | None = None, title: str = "") -> None:
        """From now on this process's logging and printed output go to ``path`` (appended: a resumed run adds to
        its log); the console keeps only the view (all of it too when verbose)."""
        if self._capture is not None:
            return
        self._saved_file = self.console._file  # noqa: SLF001 - pinned below, put back in close()
        self.console.file = self.console.file  # the real stdout, before it is replaced
        self._capture = _Capture(path, echo=self._echo if self.verbose else None)
        self._capture.write(f"==== {_dt.datetime.now().isoformat(timespec='seconds')} {title}\n")
        self.log_path, self._upload = path, upload_to
        self._line(f"log: {path}", style="dim")

    def _echo(self, line: str) -> None:
        with self._lock:
            self.console.print(Text.from_ansi(redact_text(line)), soft_wrap=True, highlight=False)

    def log_text(self, text: str) -> None:
        """Into the log file only (a traceback); onto the console too when verbose."""
        if self._capture is not None:
            self._capture.write(text if text.endswith("\n") else text + "\n")
        if self.verbose or self._capture is None:
            self.print(Text(redact_text(text)), highlight=False)

    # -- stages
    def cached(self, name: str, text: str) -> None:
        self._line(f"✓ {name}: cached ({text})", style="green")

    def started(self, name: str, key: str) -> StageProgress:
        """A stage starts; returns its progress."""
        bar = _StageBar(self, name)
        with self._lock:
            self._bars[name] = bar
            if self.live:
                if self._progress is None:
                    self._progress = Progress(
                        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=30),
                        TextColumn("{task.fields[count]}"), TextColumn("{task.fields[info]}"), _EtaColumn(),
                        TimeElapsedColumn(), console=self.console, redirect_stdout=False, redirect_stderr=False)
                    self._progress.start()
                bar.task_id = self._progress.add_task(name, total=None, count="", info="", eta_s=None)
            else:
                self._line(f"▶ {name} (key {key})", style="yellow")
        return bar

    def _update(self, bar: _StageBar, *, completed, total, advance, info, unit, eta_s) -> None:
        with self._lock:
            if total is not None:
                if bar.total != float(total):  # a new phase (scoring after training): its end is printed too
                    bar.printed_final = False
                bar.total = float(total)
            if completed is not None:
                bar.completed = float(completed)
            if advance:
                bar.completed += float(advance)
            if info is not None:
                bar.info = info
            if unit is not None:
                bar.unit = unit
            bar.eta_s = eta_s
            if self.live and self._progress is not None and bar.task_id is not None:
                self._progress.update(bar.task_id, total=bar.total, completed=bar.completed, count=bar.count(),
                                      info=bar.info, eta_s=eta_s)
                return
            final = bar.total is not None and bar.completed >= bar.total
            now = time.monotonic()
            if (final and not bar.printed_final) or now - bar.last_line >= self.every_s:
                bar.last_line, bar.printed_final = now, bar.printed_final or final
                parts = [f"  {bar.name}", bar.count(), bar.info]
                if not final:
                    eta = eta_s
                    if eta is None and bar.total and bar.completed:
                        eta = (now - bar.started) / bar.completed * (bar.total - bar.completed)
                    parts.append(f"eta {fmt_seconds(eta)}" if eta is not None else "")
                self._line("  ".join(p for p in parts if p))

    def _end_bar(self, name: str) -> None:
        bar = self._bars.pop(name, None)
        if bar is not None and self._progress is not None and bar.task_id is not None:
            self._progress.remove_task(bar.task_id)

    def done(self, name: str, seconds: float) -> None:
        with self._lock:
            self._end_bar(name)
            self._line(f"✓ {name} done in {fmt_seconds(seconds)}", style="green")

    def failed(self, name: str, error: BaseException, seconds: float | None = None) -> str:
        """A stage failed: its one-line cause first, then where the full log (with the traceback) is."""
        line = redact_text(failure_line(name, error))
        with self._lock:
            self._end_bar(name)
            self._stop_live()
            self.failure = self.failure or line
            self.print(Text(f"✗ {line}", style="bold red"), highlight=False)
            if self.log_path:
                self._line(f"  full log: {self.log_path}", style="red")
        self.log_text("".join(traceback.format_exception(type(error), error, error.__traceback__)))
        return line

    # -- the end
    def _stop_live(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def close(self) -> None:
        """Stop the live view, close the log (uploading it for a remote store) and give the console back."""
        with self._lock:
            self._stop_live()
            if self._capture is not None:
                self._capture.close()
                self._capture = None
                self.console.file = self._saved_file
                if self._upload and self.log_path:
                    try:
                        import fsspec

                        with open(self.log_path, "rb") as src, fsspec.open(self._upload, "wb") as dst:
                            dst.write(src.read())
                    except Exception as e:  # noqa: BLE001 - the local copy is still there
                        log.warning("could not upload the run log to %s: %s", self._upload, e)

    def __enter__(self) -> RunView:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_view(console: Console | None = None, *, verbose: bool = False) -> RunView:
    """The view for ``console`` (default: a new stdout console): live on a terminal, plain lines otherwise."""
    return RunView(console or Console(), verbose=verbose)
