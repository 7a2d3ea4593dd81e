"""Which stages of a planned run may run at the same time, and where: a pure scheduler over the plan's items and
their dependencies (``execute``), and the Ray side of a concurrent run (``RayStage``, ``stage_resources``).

Sequential (``concurrency=1``, the default on a laptop or CI machine): the items run one after the other in plan
order, on the calling thread, exactly as a plain loop would. Concurrent (``concurrency>1``, the default inside a
Ray job or with ``RAY_ADDRESS`` set; ``$VITPIPE_STAGE_CONCURRENCY`` overrides both): every item whose inputs are
done is started, in plan order, up to ``concurrency`` at once. An item that declares a resource request (see
``stage_resources``) runs as a Ray task with that request and is waited on from a helper thread; an item without
one (ingest, pretrain: a Ray Train launcher that must keep the driver's signal handling) runs on the calling
thread. Cached items cost nothing and are recorded at once.

Failure of one branch: nothing new starts, the branches already running are waited for (their results are kept
in the store, so a resume reuses them), then the first error is raised. An interrupt (Ctrl-C, SIGTERM turned into
``KeyboardInterrupt`` by the runner) cancels the Ray tasks in flight (they see ``KeyboardInterrupt`` and end their
tracking runs), waits for their threads, and re-raises. ``record`` always runs on the calling thread, so the
run's bookkeeping (run.json, results, statuses) needs no lock.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable, Generic, Sequence, TypeVar

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.base import Stage, StageContext
from vitpipe.jobs.train.progress import NULL_PROGRESS
from vitpipe.jobs.train.spec import TrackerRef

if TYPE_CHECKING:
    from vitpipe.jobs.run.graph import PlanItem

log = logging.getLogger(__name__)

CONCURRENCY_ENV = "VITPIPE_STAGE_CONCURRENCY"
"""Stages of one run that may run at once (1: sequential); unset: 1 locally, unbounded inside a Ray job."""
CANCEL_WAIT_S = 120.0
"""How long an interrupted run waits for its cancelled Ray tasks to end their tracking runs."""

T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------------------------ the scheduler
@dataclass(frozen=True)
class Node(Generic[T]):
    """One schedulable item: its name, the names it waits for, and whether it may run off the calling thread."""

    name: str
    deps: tuple[str, ...]
    item: T
    background: bool = False
    """True: started on a helper thread and waited on (its work runs elsewhere, e.g. a Ray task); False: runs on
    the calling thread, blocking the scheduler while it runs."""


def execute(nodes: Sequence[Node[T]], run: Callable[[Node[T]], R], record: Callable[[Node[T], R], None], *,
            concurrency: int = 1, cancel: Callable[[], None] | None = None) -> None:
    """Run every node after its deps, up to ``concurrency`` at once (module doc); ``record(node, result)`` on the
    calling thread as each finishes. Deps outside ``nodes`` count as done. Raises the first failure once nothing
    is running any more; ``cancel()`` is called on an interrupt before waiting for the background nodes."""
    names = {n.name for n in nodes}
    if len(names) != len(nodes):
        raise ValueError("scheduler: duplicate node names")
    if concurrency <= 1:
        for n in nodes:  # exactly the plain loop: plan order, the first failure stops the run
            record(n, run(n))
        return
    done: set[str] = {d for n in nodes for d in n.deps if d not in names}
    pending = list(nodes)
    running: dict[cf.Future, Node[T]] = {}
    error: BaseException | None = None
    pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vitpipe-stage")
    try:
        while pending or running:
            started = True
            while error is None and started and len(running) < concurrency:
                started = False
                for n in pending:
                    if all(d in done for d in n.deps):
                        pending.remove(n)
                        started = True
                        if n.background:
                            running[pool.submit(run, n)] = n
                        else:  # on this thread: completions of background nodes are recorded after it
                            try:
                                record(n, run(n))
                                done.add(n.name)
                            except Exception as e:  # noqa: BLE001 - kept, raised once the others have ended
                                error = error or e
                        break
            if not running:
                if error is not None or not pending:
                    break
                raise ValueError(f"scheduler: nodes {[n.name for n in pending]} wait for deps that never finish")
            finished, _ = cf.wait(list(running), timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                n = running.pop(fut)
                try:
                    record(n, fut.result())
                    done.add(n.name)
                except Exception as e:  # noqa: BLE001 - first failure wins; the others still get recorded
                    error = error or e
            if error is not None:
                pending.clear()
    except BaseException:  # KeyboardInterrupt / SystemExit on this thread: stop the background work, then leave
        if cancel is not None:
            cancel()
        cf.wait(list(running), timeout=CANCEL_WAIT_S)
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if error is not None:
        raise error


# ------------------------------------------------------------------------------------------------ stages on Ray
def default_concurrency() -> int:
    """``$VITPIPE_STAGE_CONCURRENCY``; else unbounded (every ready stage) inside a Ray job or with ``RAY_ADDRESS``
    set, where each stage brings its own resource request; else 1 (a laptop's cores are one stage's worth)."""
    raw = os.environ.get(CONCURRENCY_ENV, "").strip()
    if raw:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"${CONCURRENCY_ENV} must be an integer >= 1, got {raw!r}") from None
        if value < 1:
            raise ValueError(f"${CONCURRENCY_ENV} must be an integer >= 1, got {raw!r}")
        return value
    return 64 if on_cluster() else 1


def on_cluster() -> bool:
    """True inside a submitted Ray job or with ``RAY_ADDRESS`` set: work goes to a cluster, not this machine."""
    return bool(os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_ADDRESS"))


def stage_resources(stage: Stage, cfg: Any) -> dict[str, float] | None:
    """The Ray resource request a stage runs under in a concurrent run (its own ``resources``), or None to run it on
    the driver."""
    res = stage.resources(cfg)
    return dict(res) if res is not None else None


class RayStage:
    """``stage`` with ``run`` shipped to a Ray task under ``resources``; key, inputs and bookkeeping unchanged
    (name, version and reads are the wrapped stage's, so the cache key is the same). The task re-opens the stage's
    tracking run by reference and reports no progress bars (it has no terminal)."""

    def __init__(self, stage: Stage, resources: dict[str, float], inflight: InFlight):
        self.stage, self.resources, self.inflight = stage, dict(resources), inflight
        self.name, self.version = stage.name, stage.version

    def inputs(self, cfg: Any) -> list[str]:
        return self.stage.inputs(cfg)

    def reads(self, cfg: Any) -> dict[str, Any]:
        return self.stage.reads(cfg)

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        import ray
        from ray.exceptions import RayTaskError

        from vitpipe.jobs.core.raytools import ensure_ray
        from vitpipe.jobs.core.tracking import NullTracker

        ensure_ray()
        res = dict(self.resources)
        opts: dict[str, Any] = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0), "max_retries": 0,
                                "name": f"vitpipe-{self.name}"}
        if res:
            opts["resources"] = res
        # the view's progress bar lives in this process (no bars in a task); the tracking run is re-attached there
        remote_ctx = replace(ctx, tracker=NullTracker(), report=NULL_PROGRESS)
        ref = ray.remote(_run_remote).options(**opts).remote(self.stage, cfg, remote_ctx, TrackerRef.of(ctx.tracker))
        self.inflight.add(ref)
        try:
            return ray.get(ref)
        except RayTaskError as e:  # the stage's own error, as a sequential run would raise it
            raise e.as_instanceof_cause() from None
        finally:
            self.inflight.discard(ref)


def _run_remote(stage: Stage, cfg: Any, ctx: StageContext, tracking: TrackerRef | None) -> StageResult:
    """Inside the Ray task: the stage's ``run`` with its tracking run re-attached (metrics and artifacts land in
    the same MLflow run a sequential run would use)."""
    if tracking is not None:
        ctx = replace(ctx, tracker=tracking.attach())
    return stage.run(cfg, ctx)


class InFlight:
    """The Ray tasks a concurrent run has started and not yet seen end; ``cancel`` interrupts them all."""

    def __init__(self) -> None:
        self._refs: set[Any] = set()
        self._lock = threading.Lock()

    def add(self, ref: Any) -> None:
        with self._lock:
            self._refs.add(ref)

    def discard(self, ref: Any) -> None:
        with self._lock:
            self._refs.discard(ref)

    def cancel(self) -> None:
        import ray

        with self._lock:
            refs = list(self._refs)
        for ref in refs:  # force=False: the task sees KeyboardInterrupt and ends its tracking run itself
            ray.cancel(ref, force=False)


def run_stages(items: list[PlanItem], cfg: Any, run_item: Callable[[PlanItem], R],
               record_item: Callable[[PlanItem, R], None], *, concurrency: int | None = None,
               on_ray: Callable[[Stage, dict[str, float], InFlight], Stage] | None = None) -> None:
    """The runner's stage loop: ``record_item(it, run_item(it))`` for every plan item, sequentially or
    concurrently (module doc). ``on_ray`` wraps a stage that declares resources (default ``RayStage``; tests pass
    a wrapper that runs it on the helper thread instead)."""
    n = default_concurrency() if concurrency is None else max(1, concurrency)
    inflight = InFlight()
    wrap = on_ray or RayStage
    nodes = []
    for it in items:
        res = stage_resources(it.stage, cfg) if n > 1 and it.will_run else None
        if res is not None:
            it = replace(it, stage=wrap(it.stage, res, inflight))
        nodes.append(Node(name=it.stage.name, deps=tuple(it.stage.inputs(cfg)), item=it, background=res is not None))
    execute(nodes, lambda node: run_item(node.item), lambda node, r: record_item(node.item, r), concurrency=n,
            cancel=inflight.cancel if n > 1 else None)
