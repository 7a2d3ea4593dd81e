"""Weighted k-nearest-neighbour classifier on frozen features (DINO's ``eval_knn.py``, Wu et al. 2018).

Features are L2-normalised; each test image takes the ``k`` training images of highest cosine similarity, and
each neighbour votes for its class with weight ``exp(sim / T)``; the class with the largest summed weight wins
(ties: the lowest class index). Several ``k`` share one top-``max(k)`` search, and test features go through in
chunks so that the (chunk, n_train) similarity matrix stays under a memory bound.

    cfg = KnnConfig(ks=(10, 20))
    metrics = knn_eval(embed_fn, task, cfg)          # {"cifar10/knn/k10": 0.41, "cifar10/knn/k20": 0.42}
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitpipe.pipeline.fields import runtime_field

from .features import REPRESENTATIONS, EmbedFn, FeatureCache, bind_cache
from .fewshot import FewshotTask

__all__ = ["KnnConfig", "knn_eval", "knn_metrics", "knn_predict", "subset"]

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class KnnConfig:
    """kNN probe settings (defaults: DINO's)."""

    ks: tuple[int, ...] = (20,)
    """Neighbour counts, all from one search (DINO reports 10, 20, 100, 200; 20 is its headline)."""
    temperature: float = 0.07
    """T of the vote weight exp(cosine similarity / T)."""
    representation: str = "pre_logits"
    """Which frozen features: ``pre_logits``, ``token`` or ``gap`` (see ``features.represent``)."""
    train_limit: int | None = None
    """Use a fixed random subset of this many training images as the neighbour bank (smoke runs); None = all."""
    test_limit: int | None = None
    """Score on a fixed random subset of this many test images; None = the full test split."""
    seed: int = 0
    """Seed of the train subset (only used with a limit; the test subset is the few-shot probe's, seed 0)."""
    chunk_mb: int = runtime_field(256)
    """Memory bound (MiB) of one chunk's float32 (chunk, n_train) similarity matrix."""
    batch_size: int = runtime_field(256)
    """Images per forward pass when embedding (for the stage's ``make_embed_fn``)."""

    def __post_init__(self) -> None:
        self.ks = tuple(int(k) for k in self.ks)
        if not self.ks or min(self.ks) < 1 or len(set(self.ks)) != len(self.ks):
            raise ValueError(f"KnnConfig.ks must be distinct positive ints, got {self.ks}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"KnnConfig.temperature must be a positive number, got {self.temperature}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"KnnConfig.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        for f in ("train_limit", "test_limit"):
            if getattr(self, f) is not None and getattr(self, f) < 1:
                raise ValueError(f"KnnConfig.{f} must be >= 1 or None, got {getattr(self, f)}")
        if self.chunk_mb < 1:
            raise ValueError(f"KnnConfig.chunk_mb must be >= 1, got {self.chunk_mb}")
        if self.batch_size < 1:
            raise ValueError(f"KnnConfig.batch_size must be >= 1, got {self.batch_size}")


def subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """All of ``0..n-1``, or a sorted fixed random subset of ``limit`` of them drawn from ``seed``."""
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False)).astype(np.int64)


def knn_predict(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray,
    test_feats: np.ndarray | torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (20,),
    temperature: float = 0.07,
    *,
    chunk_size: int | None = None,
    chunk_mb: int = 256,
) -> dict[int, np.ndarray]:
    """``{k: (m,) int64 predicted classes}`` of the weighted kNN vote, float32, for every ``k`` in ``ks``.

    ``chunk_size`` test rows per similarity block (default: as many as fit in ``chunk_mb`` MiB).
    """
    x = torch.nn.functional.normalize(torch.as_tensor(np.asarray(train_feats), dtype=torch.float32), dim=1)
    q = torch.nn.functional.normalize(torch.as_tensor(np.asarray(test_feats), dtype=torch.float32), dim=1)
    y = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    if x.ndim != 2 or q.ndim != 2 or x.shape[1] != q.shape[1] or y.shape != (x.shape[0],):
        raise ValueError(f"knn needs train (n, d), labels (n,), test (m, d); got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(q.shape)}")
    if y.numel() and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"knn labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    ks = sorted(int(k) for k in ks)
    if ks[-1] > x.shape[0]:
        raise ValueError(f"knn k={ks[-1]} exceeds the {x.shape[0]} training examples")
    if chunk_size is None:
        chunk_size = max(1, (chunk_mb << 20) // (4 * max(1, x.shape[0])))
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    xt = x.T.contiguous()
    for s in range(0, q.shape[0], chunk_size):
        sim = q[s : s + chunk_size] @ xt                                  # (c, n) cosine similarities
        top, idx = sim.topk(ks[-1], dim=1, largest=True, sorted=True)    # sorted: every k is a prefix
        del sim
        # exp((sim - row max) / T): the same vote up to a per-row factor, finite for any T.
        labels, weights = y[idx], ((top - top[:, :1]) / temperature).exp()
        for k in ks:
            votes = torch.zeros(labels.shape[0], num_classes).scatter_add_(1, labels[:, :k], weights[:, :k])
            out[k].append(votes.argmax(dim=1))                           # first maximum: lowest class on ties
    return {k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.int64)).numpy() for k, v in out.items()}


def knn_metrics(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: KnnConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> Iterator[tuple[str, float]]:
    """Yield ``(<task>/knn/k<k>, accuracy)`` for every ``k`` of ``cfg``: the whole train split (or
    ``train_limit`` of it) is the neighbour bank, scored on the test split (or ``test_limit`` of it)."""
    embed_fn = bind_cache(embed_fn, cache, evaluator="knn_eval", model_key=model_key, task=task.name,
                          resolution=resolution, representation=cfg.representation)
    train_labels = np.asarray(task.train_labels, dtype=np.int64)
    test_labels = np.asarray(task.test_labels, dtype=np.int64)
    train_idx = subset(train_labels.size, cfg.train_limit, cfg.seed)
    # the few-shot probe's fixed test subset (seed 0, whatever cfg.seed): one embedding serves every evaluator
    test_idx = subset(test_labels.size, cfg.test_limit, 0)
    if max(cfg.ks) > train_idx.size:
        raise ValueError(f"knn k={max(cfg.ks)} exceeds the {train_idx.size} training images of task {task.name}")
    train = np.asarray(embed_fn("train", train_idx))
    test = np.asarray(embed_fn("test", test_idx))
    preds = knn_predict(train, train_labels[train_idx], test, len(task.classes), cfg.ks, cfg.temperature,
                        chunk_mb=cfg.chunk_mb)
    y = test_labels[test_idx]
    for k in cfg.ks:
        acc = float(np.mean(preds[k] == y))
        log.info("knn %s k=%d: %.4f (%d train, %d test)", task.name, k, acc, train_idx.size, test_idx.size)
        yield f"{task.name}/knn/k{k}", acc


def knn_eval(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: KnnConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> dict[str, float]:
    """All of :func:`knn_metrics` as an insertion-ordered dict."""
    return dict(knn_metrics(embed_fn, task, cfg, cache, model_key=model_key, resolution=resolution))
