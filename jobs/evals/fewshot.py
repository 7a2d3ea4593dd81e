"""Few-shot linear evaluation of frozen features (paper §4.1 "Metrics"; big_vision `evaluators/fewshot_lsr.py`).

For each seed, k images per class are sampled from the train split; a closed-form ridge probe on their features is
scored on the test split. Only the union of all sampled shots and the test split are embedded, once; per-class
samples are nested across k for a seed (big_vision takes prefixes of one permutation per class), so that union is
just the largest-k sample of each seed.

    cfg = FewshotConfig(shots=(1, 5, 10, 25), seeds=(0, 1, 2))
    metrics = fewshot_eval(embed_fn, task, cfg)            # {"cifar10/10shot/mean": 0.33, ...}
    for name, value in metrics.items(): tracker.metrics({name: value})
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from vitpipe.pipeline.fields import runtime_field

from .features import REPRESENTATIONS, EmbedFn, FeatureCache, bind_cache, make_embed_fn, model_fingerprint
from .ridge import BIAS_CONSTANT, RidgeProbe, ridge_fit_predict

__all__ = [
    "FeatureCache",
    "FewshotConfig",
    "FewshotTask",
    "fewshot_eval",
    "fewshot_metrics",
    "make_embed_fn",
    "model_fingerprint",
    "ridge_fit_predict",
    "sample_shots",
    "summarize",
]

log = logging.getLogger(__name__)


class FewshotTask(Protocol):
    """What the evaluator needs from a downstream task (``vitpipe.pipeline`` tasks satisfy it)."""

    name: str
    classes: list[str]
    train_labels: np.ndarray
    test_labels: np.ndarray


@dataclass(kw_only=True)
class FewshotConfig:
    """Few-shot linear probe settings."""

    shots: tuple[int, ...] = (1, 5, 10, 25)
    """Images per class in each few-shot sample (paper: 1, 5, 10, 25)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One independent sample per seed; results are reported per seed and as mean / std over seeds."""
    l2_reg: float = 1024.0
    """Ridge regulariser λ of the headline numbers (big_vision default 1024)."""
    l2_sweep: tuple[float, ...] | None = None
    """Optional extra λ values: each is reported on test (a diagnostic, never used for the headline), and λ is also
    chosen per sample by closed-form leave-one-out accuracy on the sample itself (k >= 2), reported as ``loo``."""
    representation: str = "pre_logits"
    """Which frozen features: ``pre_logits``, ``token`` (final-norm class token) or ``gap`` (mean patch token)."""
    bias_constant: float = BIAS_CONSTANT
    """Value of the appended bias feature (big_vision: 100, so the bias is almost unregularised)."""
    test_limit: int | None = None
    """Score on a fixed random subset of this many test images (smoke runs); None = the full test split (paper)."""
    batch_size: int = runtime_field(256)
    """Images per forward pass when embedding (used by the stage through ``make_embed_fn``)."""

    def __post_init__(self) -> None:
        self.shots = tuple(int(k) for k in self.shots)
        self.seeds = tuple(int(s) for s in self.seeds)
        if not self.shots or min(self.shots) < 1 or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"fewshot.shots must be distinct positive ints, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"fewshot.seeds must be distinct and non-empty, got {self.seeds}")
        if not (self.l2_reg > 0 and math.isfinite(self.l2_reg)):
            raise ValueError(f"fewshot.l2_reg must be a positive number, got {self.l2_reg}")
        if self.l2_sweep is not None:
            self.l2_sweep = tuple(float(v) for v in self.l2_sweep)
            if not self.l2_sweep or min(self.l2_sweep) <= 0:
                raise ValueError(f"fewshot.l2_sweep must be positive numbers, got {self.l2_sweep}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"fewshot.representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"fewshot.test_limit must be >= 1 or None, got {self.test_limit}")
        if self.batch_size < 1:
            raise ValueError(f"fewshot.batch_size must be >= 1, got {self.batch_size}")


def sample_shots(labels: np.ndarray, k: int, seed: int, *, num_classes: int | None = None) -> np.ndarray:
    """Indices of ``k`` examples per class (class-major order), a pure function of (labels, k, seed).

    Each class's examples are permuted once per seed and the first ``k`` taken (big_vision), so the k=5 sample of a
    seed is contained in its k=25 sample. Classes are ``0 .. num_classes-1`` (default: ``labels.max() + 1``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if members.size < k:
            raise ValueError(f"class {c} has {members.size} training examples, fewer than k={k} shots")
        picked.append(rng.permutation(members)[:k])
    return np.concatenate(picked).astype(np.int64)


def _l2_name(v: float) -> str:
    # MLflow metric names allow [A-Za-z0-9_-. :/]: no '=' or '+'.
    return "l2_" + f"{v:g}".replace("+", "")


def _spread(values: list[float]) -> float:
    # Sample std (ddof=1) over seeds: an estimate of seed-to-seed variability; 0 for a single seed.
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def fewshot_metrics(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: FewshotConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> Iterator[tuple[str, float]]:
    """Yield ``(name, value)`` pairs, big_vision style, for every (k, seed) of ``cfg`` on ``task``.

    Names: ``<task>/<k>shot/seed<s>``, ``<task>/<k>shot/mean``, ``<task>/<k>shot/std`` (accuracy in [0, 1]); with
    ``cfg.l2_sweep``: ``<task>/<k>shot/l2_<λ>/mean`` and ``<task>/<k>shot/loo/{mean,std,l2_seed<s>}``.
    With ``cache``, features go through it under ``model_key`` (required) and ``resolution``.
    """
    num_classes = len(task.classes)
    train_labels = np.asarray(task.train_labels, dtype=np.int64)
    test_labels = np.asarray(task.test_labels, dtype=np.int64)
    if train_labels.size and train_labels.max() >= num_classes:
        raise ValueError(f"task {task.name}: train label {train_labels.max()} outside its {num_classes} classes")
    embed_fn = bind_cache(embed_fn, cache, evaluator="fewshot_eval", model_key=model_key, task=task.name,
                          resolution=resolution, representation=cfg.representation)

    samples = {(k, s): sample_shots(train_labels, k, s, num_classes=num_classes) for k in cfg.shots for s in cfg.seeds}
    train_idx = np.unique(np.concatenate(list(samples.values())))
    test_idx = np.arange(test_labels.size)
    if cfg.test_limit is not None and cfg.test_limit < test_idx.size:
        # Fixed subset (independent of the shot seeds), sorted so caches and loaders read in order.
        test_idx = np.sort(np.random.default_rng(0).choice(test_idx, cfg.test_limit, replace=False))

    t0 = time.perf_counter()
    train_feats = np.asarray(embed_fn("train", train_idx))
    test_feats = np.asarray(embed_fn("test", test_idx))
    log.info("fewshot %s: %d train + %d test features (dim %d) in %.1fs", task.name, train_idx.size, test_idx.size,
             train_feats.shape[1], time.perf_counter() - t0)
    y_test = test_labels[test_idx]
    test_feats = torch.as_tensor(test_feats, dtype=torch.float32)  # converted once, shared by every probe

    sweep = cfg.l2_sweep or ()
    for k in cfg.shots:
        accs, loo_accs = [], []
        sweep_accs: dict[float, list[float]] = {v: [] for v in sweep}
        for s in cfg.seeds:
            idx = samples[(k, s)]
            probe = RidgeProbe(train_feats[np.searchsorted(train_idx, idx)], train_labels[idx], num_classes,
                               bias_constant=cfg.bias_constant)
            if len(sweep) > 1:
                probe.use_eig()  # one factorisation serves every λ and the leave-one-out choice
            acc = probe.accuracy(test_feats, y_test, cfg.l2_reg)
            accs.append(acc)
            yield f"{task.name}/{k}shot/seed{s}", acc
            for v in sweep:
                sweep_accs[v].append(probe.accuracy(test_feats, y_test, v))
            if sweep and k >= 2:
                # Choose λ on the sample alone; ties go to the larger λ (the more regularised probe).
                best = max(sorted(sweep, reverse=True), key=probe.loo_accuracy)
                loo_accs.append(probe.accuracy(test_feats, y_test, best))
                yield f"{task.name}/{k}shot/loo/l2_seed{s}", best
        yield f"{task.name}/{k}shot/mean", float(np.mean(accs))
        yield f"{task.name}/{k}shot/std", _spread(accs)
        for v in sweep:
            yield f"{task.name}/{k}shot/{_l2_name(v)}/mean", float(np.mean(sweep_accs[v]))
        if loo_accs:
            yield f"{task.name}/{k}shot/loo/mean", float(np.mean(loo_accs))
            yield f"{task.name}/{k}shot/loo/std", _spread(loo_accs)


def fewshot_eval(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: FewshotConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> dict[str, float]:
    """All of :func:`fewshot_metrics` as an insertion-ordered dict (``.items()`` gives the pairs)."""
    return dict(fewshot_metrics(embed_fn, task, cfg, cache, model_key=model_key, resolution=resolution))


def summarize(metrics: dict[str, float], task: str) -> dict[int, tuple[float, float]]:
    """``{k: (mean, std)}`` of one task's headline few-shot accuracies, e.g. for ``analysis.fewshot_curve``."""
    out: dict[int, tuple[float, float]] = {}
    prefix = f"{task}/"
    for name, value in metrics.items():
        if name.startswith(prefix) and name.endswith("shot/mean") and name.count("/") == 2:
            k = int(name[len(prefix) : -len("shot/mean")])
            out[k] = (value, metrics.get(f"{prefix}{k}shot/std", 0.0))
    return dict(sorted(out.items()))
