"""Eval-transformed images of a task kept in memory across evaluations of a model whose weights change (in-training
evaluation): decoding full-size photos would otherwise cost more than the forward passes of each evaluation."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .features import EmbedFn, represent
from .fewshot import FewshotConfig, fewshot_eval

__all__ = ["ImageBank"]


class ImageBank:
    """Eval-transformed images of one task, decoded once and kept across evaluations up to ``budget_bytes`` (only
    the weights change between evaluations; decoding full-size photos would otherwise dominate each one)."""

    def __init__(self, task: Any, img_size: int, budget_bytes: int, batch_size: int = 256):
        from vitpipe.pipeline import ImageTransform

        self.task, self.batch_size = task, batch_size
        self.tf = ImageTransform(img_size=img_size, train=False)
        self.rows: dict[tuple[str, int], torch.Tensor] = {}
        self.budget, self.used = budget_bytes, 0

    def images(self, split: str, indices: np.ndarray) -> torch.Tensor:
        """(n, 3, H, W) float32 images of ``split`` at ``indices``, in that order."""
        idx = [int(i) for i in np.asarray(indices, dtype=np.int64)]
        missing = [i for i in dict.fromkeys(idx) if (split, i) not in self.rows]
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            pos = 0
            for x, _ in self.task.batches(split, np.asarray(missing, dtype=np.int64), self.tf, self.batch_size):
                for row in x:
                    i, pos = missing[pos], pos + 1
                    if self.used + row.numel() * row.element_size() <= self.budget:
                        self.rows[(split, i)] = row.clone()
                        self.used += row.numel() * row.element_size()
                    else:
                        fresh[i] = row
        return torch.stack([fresh[i] if i in fresh else self.rows[(split, i)] for i in idx])

    def embed_fn(self, model: torch.nn.Module, device: torch.device, batch_size: int,
                 representation: str = "pre_logits") -> EmbedFn:
        """``embed_fn(split, indices)`` of ``model`` over this bank's images."""
        def embed(split: str, indices: np.ndarray) -> np.ndarray:
            x = self.images(split, indices)
            out = []
            with torch.inference_mode():
                for s in range(0, x.shape[0], batch_size):
                    out.append(represent(model, x[s : s + batch_size].to(device), representation).float().cpu().numpy())
            return np.concatenate(out, axis=0)

        return embed

    def prime(self, cfg: FewshotConfig) -> None:
        """Decode every image an evaluation with ``cfg`` will ask for (a probe on constant features, discarded)."""
        def decode_only(split: str, indices: np.ndarray) -> np.ndarray:
            self.images(split, indices)
            return np.zeros((len(indices), 1), np.float32)

        fewshot_eval(decode_only, self.task, cfg)
