"""Where the pretraining loop's checkpoints go: the seam between :class:`~vitpipe.jobs.train.trainer.Trainer` and
a store. The Ray Train worker uses :class:`~vitpipe.jobs.train.ckpt_store.RayTrainCheckpointer` (save, upload and
report through Ray Train; resume and rollback from the checkpoints Ray registered); tests and benchmarks that run
the same loop in one process use :class:`LocalCheckpointer` (a local folder) or :class:`NoCheckpointer`.

Every method is collective: all ranks call it at the same step, with the same arguments where it says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any, Protocol

from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.ckpt_manifest import verify, write_listing

log = logging.getLogger("vitpipe.pretrain")


class Checkpointer(Protocol):
    def resume(self, stack: contextlib.ExitStack) -> str | None:
        """Local folder of the newest complete checkpoint to start from (kept until ``stack`` closes); None for a
        fresh start."""

    def save(self, engine: Any, *, step: int, rank: int, world: int, client: dict, metrics: dict,
             fresh_timeline: bool) -> None:
        """Save the checkpoint of ``step`` (``client``: the trainer's state; ``metrics``: the last logged window;
        ``fresh_timeline``: no checkpoint of this run can exist at a later step)."""

    def rollback(self, engine: Any, before_verify: Callable[[list[Any]], None] | None = None) -> dict | None:
        """Load the newest complete checkpoint into ``engine``; its client state, or None when there is none."""


class NoCheckpointer:
    """Saves nothing; a rollback finds nothing (the loop then skips the bad step and goes on)."""

    def resume(self, stack: contextlib.ExitStack) -> str | None:
        return None

    def save(self, engine: Any, **_: Any) -> None:
        pass

    def rollback(self, engine: Any, before_verify: Callable[[list[Any]], None] | None = None) -> dict | None:
        return None


class LocalCheckpointer:
    """Checkpoints under a local folder ``root`` that every rank can write (one machine): ``root/step_XXXXXXXX``,
    the newest ``keep`` kept. Same layout and completeness check as the Ray Train store (meta, per-rank
    listings), without the upload."""

    def __init__(self, root: str, keep: int = 2):
        self.root, self.keep = root, keep

    def _complete(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        names = sorted(n for n in os.listdir(self.root) if n.startswith("step_"))
        return [os.path.join(self.root, n) for n in names if not verify(os.path.join(self.root, n))]

    def resume(self, stack: contextlib.ExitStack) -> str | None:
        done = self._complete()
        return done[-1] if done else None

    def save(self, engine: Any, *, step: int, rank: int, world: int, client: dict, metrics: dict,
             fresh_timeline: bool) -> None:
        d = os.path.join(self.root, f"step_{step:08d}")
        if rank == 0 and os.path.isdir(d):
            shutil.rmtree(d)  # a step reached again after a rollback
        _barrier()
        ckpt.save(engine, d, step, client)
        if rank == 0:
            ckpt.write_meta(d, {"world_size": world, "tag": f"step{step}", "step": step})
        _barrier()
        # One shared folder: once every rank has saved, rank 0 lists all files; the others list none (the listings
        # guard against a rank dying mid-save, which the barrier already rules out here).
        if rank == 0:
            write_listing(d, 0)
        else:
            _empty_listing(d, rank)
        _barrier()
        if rank == 0:
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def rollback(self, engine: Any, before_verify: Callable[[list[Any]], None] | None = None) -> dict | None:
        done = self._complete()
        if not done:
            return None
        return ckpt.load(engine, done[-1])


def _empty_listing(directory: str, rank: int) -> None:
    import json

    from vitpipe.jobs.train.ckpt_manifest import listing_name

    os.makedirs(os.path.dirname(os.path.join(directory, listing_name(rank))), exist_ok=True)
    with open(os.path.join(directory, listing_name(rank)), "w") as f:
        json.dump({"rank": rank, "files": {}}, f)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
