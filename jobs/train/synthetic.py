"""Synthetic batches with :class:`~vitpipe.pipeline.ShardStream`'s interface, for benchmarks and tests that time or
count the training step itself (``benchmarks/step_overhead.py``, ``benchmarks/pretrain_speed.py``,
``tests/jobs/test_step_syncs.py``) without shards. Every batch is a pure function of (seed, rank, index)."""

from __future__ import annotations

from typing import Iterator

import torch


class SyntheticStream:
    """``batches_per_epoch`` batches of ``batch`` random images (3 x ``img_size``²) and labels below
    ``num_classes`` per epoch; ``fixed``: one batch repeated (no generation cost inside a timed loop), made on
    ``device`` (a GPU benchmark then times the step, not the host-to-device copy)."""

    def __init__(self, *, batch: int, img_size: int, num_classes: int, seed: int = 0, rank: int = 0,
                 batches_per_epoch: int = 1000, fixed: bool = False, device: str | torch.device = "cpu"):
        self.batch, self.img_size, self.num_classes = batch, img_size, num_classes
        self.seed, self.rank, self.n, self.fixed, self.device = seed, rank, batches_per_epoch, fixed, device
        self.epoch, self.index = 0, 0
        self.stats: dict = {}
        self._fixed = tuple(t.to(device) if torch.is_tensor(t) else t for t in self._make(0)) if fixed else None

    def _make(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        g = torch.Generator().manual_seed(((self.seed * 7919 + self.rank) * 104_729 + self.epoch) * 1_000_003 + i)
        x = torch.randn(self.batch, 3, self.img_size, self.img_size, generator=g)
        y = torch.randint(0, self.num_classes, (self.batch,), generator=g)
        return x, y, [f"e{self.epoch}-b{i}-{j}" for j in range(self.batch)]

    def batches_per_epoch(self) -> int:
        return self.n

    def iter_batches(self, with_keys: bool = True) -> Iterator[tuple]:
        while self.index < self.n:
            b = self._fixed if self.fixed else self._make(self.index)
            self.index += 1
            yield b if with_keys else b[:2]
        self.epoch, self.index = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]

    def close(self) -> None:
        pass
