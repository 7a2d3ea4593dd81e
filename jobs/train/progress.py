"""Progress of a running stage, carried from wherever the work runs to the driver's view of the run.

A stage reports through a :class:`StageProgress` (the runner's view puts one in the stage's context; a stage that
runs without a view gets the null one). Work that runs in Ray Train workers reports from rank 0 through a
:class:`ProgressFeed`: the stage creates it (a ``ray.util.queue.Queue``, so it works across the nodes of a cluster
as well as on a laptop), hands its :meth:`~ProgressFeed.sender` to the workers, and a thread on the driver moves
what arrives onto the stage's progress. :class:`ProgressCallback` is the pretraining loop's side of it: a
:class:`~vitpipe.jobs.train.callbacks.TrainerCallback` that sends the step, loss and throughput of every logging
window (rank 0 only; never a worker log line).

    with ProgressFeed(ctx.report) as feed:
        TorchTrainer(partial(train_entry, pretrain_worker, callbacks=[ProgressCallback(feed.sender())]), ...).fit()
    feed.marks  # driver-side times (s since the feed opened) of the workers' start/train/end events
"""

from __future__ import annotations

import logging
import queue as _queue
import threading
import time
from typing import TYPE_CHECKING, Any

from vitpipe.jobs.train.callbacks import TrainerCallback

if TYPE_CHECKING:
    from vitpipe.jobs.train.trainer import Trainer

__all__ = ["NULL_PROGRESS", "DirectSender", "ProgressCallback", "ProgressFeed", "ProgressSender",
           "StageProgress", "apply_event", "step_info"]

log = logging.getLogger(__name__)

"""Key of a stage's :class:`StageProgress` in ``StageContext.extra``."""


class StageProgress:
    """How a stage says how far it is. This base class records nothing (the null progress); the run's view
    implements it as a bar (terminal) or as lines at a bounded rate (piped output).

    Shipped to another process (pickled, e.g. with a stage context sent to a Ray task) any progress becomes the
    null one: a bar lives in the driver, and what runs elsewhere reports through a :class:`ProgressFeed`."""

    def update(self, *, completed: float | None = None, total: float | None = None, advance: float | None = None,
               info: str | None = None, unit: str | None = None, eta_s: float | None = None) -> None:
        """``completed`` (absolute) or ``advance`` (relative) out of ``total`` ``unit``s; ``info`` a short status
        text (``loss 2.31 · 87 img/s``, ``starting workers``); ``eta_s`` the stage's own estimate of the time left
        (None: the view estimates from the rate)."""

    def __reduce__(self) -> tuple:
        return (StageProgress, ())


NULL_PROGRESS = StageProgress()


def step_info(loss: float | None = None, images_per_s: float | None = None) -> str:
    """The status text of a training step: ``loss 2.307 · 87 img/s``."""
    parts = []
    if loss is not None:
        parts.append(f"loss {loss:.3f}")
    if images_per_s is not None:
        parts.append(f"{images_per_s:.0f} img/s")
    return " · ".join(parts)


def apply_event(progress: StageProgress, event: dict, unit: str = "steps") -> None:
    """One event of a sender onto ``progress``. Kinds: ``start`` / ``end`` (step, total), ``step`` (step, total,
    and optionally loss, images_per_s, eta_s, unit, info), ``phase`` (text)."""
    kind = event.get("kind", "")
    if kind == "phase":
        progress.update(info=str(event.get("text", "")))
    elif kind in ("start", "step", "end"):
        if kind == "step":
            info = event.get("info") or step_info(event.get("loss"), event.get("images_per_s"))
        else:
            info = "training" if kind == "start" else "finishing"
        progress.update(completed=event.get("step"), total=event.get("total"), unit=event.get("unit", unit),
                        info=info, eta_s=event.get("eta_s") if kind == "step" else None)


# ------------------------------------------------------------------------------------------------ worker side
class DirectSender:
    """A sender for work that runs in the driver itself: events go straight onto ``progress``."""

    def __init__(self, progress: StageProgress, unit: str = "steps"):
        self.progress, self.unit = progress, unit

    def send(self, kind: str, **fields: Any) -> None:
        apply_event(self.progress, {"kind": kind, **fields}, self.unit)


class ProgressSender:
    """What a worker holds: puts events into the feed's queue. Never fails the training: once the queue is gone
    (the driver ended the feed) sending stops quietly."""

    def __init__(self, q: Any):
        self._q = q
        self._broken = False

    def send(self, kind: str, **fields: Any) -> None:
        """One event (``kind``: ``start``, ``step``, ``phase``, ``end``) with JSON-like ``fields``."""
        if self._broken or self._q is None:
            return
        try:
            self._q.put_nowait({"kind": kind, **fields})
        except Exception as e:  # noqa: BLE001 - progress is never worth a failed run
            self._broken = True
            log.debug("progress feed gone (%s); not sending any more", e)


class ProgressCallback(TrainerCallback):
    """The pretraining loop's progress for the driver (rank 0): the start (restored step, total), every logging
    window's step / loss / throughput / ETA, the end of training (then the export runs)."""

    def __init__(self, sender: ProgressSender):
        self.sender = sender

    def on_setup(self, rank: int, phase: str) -> None:
        if rank == 0:  # its arrival time is the driver's mark of that milestone (ProgressFeed.marks)
            self.sender.send(phase)

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            self.sender.send("start", step=trainer.state.step, total=trainer.p.steps)

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        p, step = trainer.p, trainer.state.step
        ips = metrics.get("train/images_per_s")
        eta = (p.steps - step) * p.global_batch / ips if ips else None
        self.sender.send("step", step=step, total=p.steps, loss=metrics.get("train/loss"), images_per_s=ips,
                         eta_s=eta)

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.rank == 0:
            self.sender.send("end", step=trainer.state.step, total=trainer.p.steps)


# ------------------------------------------------------------------------------------------------ driver side
class ProgressFeed:
    """Driver side of a Ray-carried progress: a ``ray.util.queue.Queue`` (an actor holding no CPU) and a thread
    that applies each event to ``progress``. A context manager: the queue lives while the stage's workers run.

    Events: ``entered`` / ``ready`` (a worker's setup milestones), ``start`` (step, total), ``step`` (step, total,
    loss, images_per_s, eta_s), ``phase`` (text), ``end``; their arrival times are kept in :attr:`marks` (first
    arrival of each kind, seconds since the feed opened) so a stage can say where its time went (worker start,
    training, export)."""

    def __init__(self, progress: StageProgress = NULL_PROGRESS, *, unit: str = "steps", poll_s: float = 0.25):
        self.progress, self.unit, self.poll_s = progress, unit, poll_s
        self.marks: dict[str, float] = {}
        self.last: dict[str, Any] = {}
        self._q: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    def _queue(self) -> Any:
        if self._q is None:
            if self._stop.is_set():
                raise RuntimeError("ProgressFeed used after it was closed")
            from ray.util.queue import Queue

            self._q = Queue(actor_options={"num_cpus": 0})  # never takes a core from the training workers
        return self._q

    def __enter__(self) -> ProgressFeed:
        self._queue()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._pump, name="vitpipe-progress", daemon=True)
        self._thread.start()
        return self

    def sender(self) -> ProgressSender:
        """The picklable end the workers get (via the train loop's arguments); may be taken before the feed is
        entered (the train loop is built before ``fit``), which creates its queue."""
        return ProgressSender(self._queue())

    def mark(self, name: str) -> None:
        """Record a driver-side event (e.g. ``fit_returned``) in :attr:`marks`."""
        self.marks.setdefault(name, time.perf_counter() - self._t0)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()  # also: no queue is made after this
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._q is not None:
            try:
                self._drain()
                self._q.shutdown()
            except Exception as e:  # noqa: BLE001 - a cluster that went away takes its queue with it
                log.debug("progress queue shutdown: %s", e)
            self._q = None

    # -- internals
    def _pump(self) -> None:
        while not self._stop.is_set():
            try:
                self._apply(self._q.get(block=True, timeout=self.poll_s))
            except _queue.Empty:
                continue
            except Exception as e:  # noqa: BLE001 - the queue actor died: no more progress, the stage goes on
                log.debug("progress feed stopped: %s", e)
                return

    def _drain(self) -> None:
        n = self._q.qsize()
        for event in self._q.get_nowait_batch(n) if n else []:
            self._apply(event)

    def _apply(self, event: dict) -> None:
        self.marks.setdefault(event.get("kind", ""), time.perf_counter() - self._t0)
        self.last = event
        apply_event(self.progress, event, self.unit)
