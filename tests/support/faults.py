"""Fault injection and audit records for the pretraining loop's hook seam (``vitpipe.jobs.train.hooks``). Loaded
by the workers only when a test sets ``VITPIPE_TEST_HOOKS`` to a JSON object with these keys:

- ``record_keys``: every rank appends each step's sample keys to ``<out>/debug/keys-rank{r}.jsonl`` (and a resumed
  attempt writes its resume step to ``keys-rankresume.jsonl``).
- ``kill_rank`` + ``kill_after_step``: that rank SIGKILLs itself after saving that step's checkpoint (first attempt).
- ``hold_after_steps`` (+ ``hold_s`` 60): every rank sleeps after saving those steps (a window for a test to take a
  node away after a checkpoint).
- ``nan_step`` (+ ``nan_rank`` 0, ``nan_micro`` 0, ``nan_times`` 1): that rank's loss is NaN at that micro-batch of
  that step, the first ``nan_times`` times the run computes that step.
- ``record_weights``: at every checkpoint save and rollback, rank 0 appends ``{event, step, engine_step, micro_steps,
  lr, digest}`` (DeepSpeed's counters; digest: sha256 of the full fp32 weights) to ``<out>/debug/weights.jsonl``.
- ``damage_on_rollback``: before the first rollback verifies, rank 0 truncates the biggest file of the newest
  registered checkpoint in storage (a shard cut short).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

import fsspec
import torch

from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.hooks import TrainerHooks


class FaultHooks(TrainerHooks):
    def __init__(self, settings: dict, rank: int, out_url: str):
        self.d = settings
        self.rank = rank
        self.out_url = out_url
        self.records_keys = bool(settings.get("record_keys"))
        self._nans = 0
        self._damaged = False

    def on_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        d = self.d
        if (d.get("nan_step") == step and d.get("nan_rank", 0) == self.rank and d.get("nan_micro", 0) == micro
                and self._nans < d.get("nan_times", 1)):
            self._nans += 1
            return loss * float("nan")
        return loss

    def on_step_keys(self, who: int | str, step: int, keys: list[str]) -> None:
        if self.records_keys:
            self._append(f"keys-rank{who}.jsonl", {"step": step, "keys": keys})

    def after_save(self, engine: Any, step: int, resumed: bool) -> None:
        self._record_weights(engine, "save", step)
        if not resumed and self.d.get("kill_rank") == self.rank and self.d.get("kill_after_step") == step:
            os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-epoch, after a checkpoint
        if step in self.d.get("hold_after_steps", ()):
            time.sleep(self.d.get("hold_s", 60))

    def after_rollback(self, engine: Any, step: int) -> None:
        self._record_weights(engine, "rollback", step)

    def before_rollback_verify(self, checkpoints: list[Any]) -> None:
        """Collective (a barrier) when ``damage_on_rollback`` is on."""
        if not self.d.get("damage_on_rollback") or self._damaged:
            return
        self._damaged = True
        if self.rank == 0:
            from pyarrow.fs import FileSelector, FileType

            cp = checkpoints[-1]
            infos = cp.filesystem.get_file_info(FileSelector(cp.path, recursive=True))
            big = max((i for i in infos if i.type == FileType.File), key=lambda i: i.size)
            with cp.filesystem.open_input_stream(big.path) as f:
                data = f.read()
            with cp.filesystem.open_output_stream(big.path) as f:
                f.write(data[: len(data) // 2])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _record_weights(self, engine: Any, event: str, step: int) -> None:
        """Collective (gathers the full weights) when ``record_weights`` is on."""
        if not self.d.get("record_weights"):
            return
        sd = ckpt.full_fp32_state_dict(engine)
        if self.rank == 0:
            h = hashlib.sha256()
            for name in sorted(sd):
                h.update(name.encode())
                h.update(sd[name].contiguous().numpy().tobytes())
            self._append("weights.jsonl", {"event": event, "step": step, "engine_step": engine.global_steps,
                                           "micro_steps": engine.micro_steps, "lr": engine.get_lr()[0],
                                           "digest": h.hexdigest()})

    def _append(self, name: str, rec: dict) -> None:
        with fsspec.open(f"{self.out_url}/debug/{name}", "a") as f:
            f.write(json.dumps(rec) + "\n")
