"""Checkpoints between a Ray Train worker and the run's storage: saving with (async) upload, and loading the newest
complete one for a resume or a rollback.

Saving: each rank writes its DeepSpeed shard, rank 0 the meta, then every rank its file listing (ckpt_manifest) into
a local temporary folder; ``ray.train.report`` copies it to ``<storage>/ray/<name>`` (Ray merges the ranks' folders)
and deletes the local folder once copied. With ``pretrain.checkpoint_upload="async"`` the copy runs on Ray's
per-worker upload thread (one thread: uploads finish in report order) while training goes on; the next save first
waits until every rank's previous upload is in, so at most one checkpoint per rank waits on local disk.

Loading: the candidates are the checkpoints Ray registered for the run (every rank reported them) and still keeps;
the newest whose manifest verifies is used, the same on every rank. A rollback also reads from storage, never from
the rank-local folder: on ranks > 0 that holds only the rank's optimizer shard, while DeepSpeed's load needs the
``latest`` tag file and (ZeRO 0-2) the model states, both written by rank 0 only.

:class:`RayTrainCheckpointer` is this module as the trainer's checkpointer (``jobs/train/checkpointer.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from fsspec.implementations.arrow import ArrowFSWrapper

from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.ckpt_manifest import verify, write_listing
from vitpipe.jobs.train.dist import gather_floats

log = logging.getLogger("vitpipe.pretrain")

UPLOAD_WAIT_S = 3600.0


def checkpoint_name(step: int, fresh_timeline: bool) -> str:
    """Storage folder name of the checkpoint at ``step``. After a resume or a rollback the run can reach a step whose
    folder exists already (a damaged checkpoint it skipped, a killed attempt's partial upload); writing into it would
    mix files, and Ray deleting the old entry would delete the new one too: such runs get a fresh suffix (each rank
    draws one; Ray adopts rank 0's name for all)."""
    return f"step_{step:08d}" if fresh_timeline else f"step_{step:08d}-{uuid.uuid4().hex[:6]}"


def save_local(engine: Any, step: int, rank: int, world: int, client: dict) -> str:
    """Write this rank's part of the checkpoint at ``step`` into a new local folder; returns the folder."""
    d = tempfile.mkdtemp(prefix=f"vitpipe-ckpt-r{rank}-")
    ckpt.save(engine, d, step, client)
    if rank == 0:
        ckpt.write_meta(d, {"world_size": world, "tag": f"step{step}", "step": step})
    write_listing(d, rank)  # last: it lists what this rank saved above
    return d


def save_and_report(engine: Any, step: int, rank: int, world: int, client: dict, metrics: dict, name: str,
                    upload: str) -> None:
    """Save this rank's part (collective in DeepSpeed) and hand it to Ray Train for upload (``upload``: async|sync)."""
    import ray.train

    if upload == "async":
        committed()  # back-pressure: the previous checkpoint's uploads (all ranks) finish before another queues
    t0 = time.perf_counter()
    d = save_local(engine, step, rank, world, client)
    t1 = time.perf_counter()
    mode = ray.train.CheckpointUploadMode.ASYNC if upload == "async" else ray.train.CheckpointUploadMode.SYNC
    # The local folder goes once uploaded (Ray's ASYNC default, explicit for SYNC): nothing reads it afterwards.
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name,
                     checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=True)
    if rank == 0:
        log.info("checkpoint %s: saved in %.1fs, training resumed %.1fs later (%s upload)", name, t1 - t0,
                 time.perf_counter() - t1, upload)


def committed(timeout_s: float = UPLOAD_WAIT_S) -> list[Any]:
    """The run's registered checkpoints (``ray.train.Checkpoint``, oldest first), once Ray holds every rank's
    reports so far: blocks while an async upload of any rank is still running."""
    import ray.train

    t0 = time.perf_counter()
    reported = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=timeout_s)
    if time.perf_counter() - t0 > 1.0:
        log.info("waited %.1fs for checkpoint uploads", time.perf_counter() - t0)
    return [r.checkpoint for r in reported]


@contextlib.contextmanager
def newest_verified(candidates: list[Any], purpose: str) -> Iterator[tuple[Any, str]]:
    """Yield ``(checkpoint, local folder)`` for the newest of ``candidates`` (oldest first; ``ray.train.Checkpoint``
    objects) whose manifest verifies, logging each one skipped and why. Collective: every rank must call it with
    the same candidates, and all must settle on the same one (else RuntimeError); RuntimeError too if none
    verifies. The folder is the checkpoint itself on local storage, else a download removed on exit."""
    with contextlib.ExitStack() as keep:
        chosen, local, skipped = -1, "", []
        for i in range(len(candidates) - 1, -1, -1):
            cp = candidates[i]
            # checked where it lies (a few small reads and size look-ups), so an incomplete one is never downloaded
            problems = verify(cp.path, fs=ArrowFSWrapper(cp.filesystem))
            if not problems:
                chosen, local = i, keep.enter_context(cp.as_directory())
                break
            skipped.append(f"{_name(cp)}: {'; '.join(problems[:3])}{' ...' if len(problems) > 3 else ''}")
        choices = [int(c) for c in gather_floats(chosen)]
        if _rank() == 0 or len(set(choices)) > 1:
            for why in skipped:
                log.warning("%s: skipping incomplete checkpoint %s", purpose, why)
        if len(set(choices)) > 1:
            raise RuntimeError(f"{purpose}: ranks disagree on the newest complete checkpoint (index per rank "
                               f"{choices} of {[_name(c) for c in candidates]}); refusing to load different states")
        if chosen < 0:
            raise RuntimeError(f"{purpose}: none of the run's {len(candidates)} checkpoint(s) is complete: "
                               + " | ".join(skipped))
        if skipped and _rank() == 0:
            log.warning("%s: using %s after skipping %d newer incomplete checkpoint(s)", purpose,
                        _name(candidates[chosen]), len(skipped))
        yield candidates[chosen], local


def rollback(engine: Any, before_verify: Callable[[list[Any]], None] | None = None) -> dict | None:
    """Reload the newest complete registered checkpoint into ``engine`` (weights, optimizer, LR schedule, step count);
    returns its client state, or None if the run has no checkpoint yet. Collective."""
    candidates = committed()
    if not candidates:
        return None
    if before_verify is not None:
        before_verify(candidates)
    with newest_verified(candidates, "rollback") as (_, d):
        return ckpt.load(engine, d)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _name(cp: Any) -> str:
    return os.path.basename(str(cp.path).rstrip("/"))


class RayTrainCheckpointer:
    """The :class:`~vitpipe.jobs.train.checkpointer.Checkpointer` of a Ray Train worker: ``restored`` is what
    ``ray.train.get_checkpoint()`` gave the attempt (None: a fresh start); ``upload``:
    ``pretrain.checkpoint_upload``."""

    def __init__(self, restored: Any, upload: str):
        self.restored, self.upload = restored, upload

    def resume(self, stack: contextlib.ExitStack) -> str | None:
        if self.restored is None:
            return None
        # the newest complete one Ray holds (the one it restored, or an older one if that is incomplete)
        _, d = stack.enter_context(newest_verified(committed() or [self.restored], "resume"))
        return d

    def save(self, engine: Any, *, step: int, rank: int, world: int, client: dict, metrics: dict,
             fresh_timeline: bool) -> None:
        save_and_report(engine, step, rank, world, client, metrics, checkpoint_name(step, fresh_timeline),
                        self.upload)

    def rollback(self, engine: Any, before_verify: Callable[[list[Any]], None] | None = None) -> dict | None:
        return rollback(engine, before_verify=before_verify)
