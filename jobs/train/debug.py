"""Test hooks of the pretraining loop, from ``spec["debug"]`` (env ``VITPIPE_PRETRAIN_DEBUG``); configs never set them.

- ``record_keys``: every rank appends each step's sample keys to ``<out>/debug/keys-rank{r}.jsonl``.
- ``kill_rank`` + ``kill_after_step``; ``hold_after_steps`` (+ ``hold_s``): see the loop.
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
from typing import Any

import fsspec
import torch

from vitpipe.jobs.train import checkpoint as ckpt


class Debug:
    def __init__(self, spec: dict, rank: int):
        self.d: dict = spec.get("debug") or {}
        self.rank = rank
        self.out_url = spec["out_url"]
        self._nans = 0
        self._damaged = False

    def get(self, key: str, default: Any = None) -> Any:
        return self.d.get(key, default)

    def record_keys(self, who: int | str, step: int, keys: list[str]) -> None:
        self._append(f"keys-rank{who}.jsonl", {"step": step, "keys": keys})

    def nan(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """``loss``, or NaN where the hook says so."""
        d = self.d
        if (d.get("nan_step") == step and d.get("nan_rank", 0) == self.rank and d.get("nan_micro", 0) == micro
                and self._nans < d.get("nan_times", 1)):
            self._nans += 1
            return loss * float("nan")
        return loss

    def record_weights(self, engine: Any, event: str, step: int) -> None:
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

    def damage(self, checkpoints: list[Any]) -> None:
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

    def _append(self, name: str, rec: dict) -> None:
        with fsspec.open(f"{self.out_url}/debug/{name}", "a") as f:
            f.write(json.dumps(rec) + "\n")
