"""Evaluator registry (big_vision ``evaluators/``): probes on frozen features picked by a ``type`` string.

Every evaluator takes an embedding function ``embed_fn(split, indices) -> (n, d)`` over a task's images, a task
(``name``, ``classes``, ``train_labels``, ``test_labels``) and its typed config, and yields ``(name, value)`` pairs:

    for name, value in run_evaluators([("fewshot", None), ("knn", {"ks": [10, 20]}), ("linear", None)],
                                      embed_fn, task, cache=cache, model_key=key, resolution=64):
        tracker.metrics({name: value})

Features come through one chain per (model, task, resolution, representation): an in-process
:class:`FeatureMemo` (each split read or embedded once per run, however many evaluators ask), then the persistent
``FeatureCache`` (only images it lacks are embedded), then ``embed_fn``. A task view (``task.validation()``) reads
and writes the features of the task it is a view of, so validation and test evaluations embed each image once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .features import EmbedFn, FeatureCache
from .fewshot import FewshotConfig, fewshot_metrics
from .knn import KnnConfig, knn_metrics
from .linear_probe import LinearProbeConfig, linear_metrics

__all__ = ["EVALUATORS", "Evaluator", "FeatureMemo", "evaluator_config", "run_evaluator", "run_evaluators"]


@dataclass(frozen=True)
class Evaluator:
    """One registered evaluator: its config class and its metrics generator
    ``metrics(embed_fn, task, cfg) -> Iterator[(name, value)]``."""

    config: type
    metrics: Callable[..., Iterator[tuple[str, float]]]


EVALUATORS: dict[str, Evaluator] = {
    "fewshot": Evaluator(FewshotConfig, fewshot_metrics),
    "knn": Evaluator(KnnConfig, knn_metrics),
    "linear": Evaluator(LinearProbeConfig, linear_metrics),
}


def _evaluator(type_: str) -> Evaluator:
    if type_ not in EVALUATORS:
        raise ValueError(f"unknown evaluator type {type_!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[type_]


def evaluator_config(type_: str, cfg: Any = None) -> Any:
    """The typed config of evaluator ``type_`` from None (defaults), a mapping of its fields (e.g. parsed YAML;
    lists become tuples in the configs' own validation) or an instance."""
    cls = _evaluator(type_).config
    if cfg is None:
        return cls()
    if isinstance(cls, type) and isinstance(cfg, cls):
        return cfg
    if isinstance(cfg, Mapping):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"{type_} evaluator config has unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**cfg)
    raise ValueError(f"{type_} evaluator config must be a {cls.__name__} or a mapping, got {type(cfg).__name__}")


class FeatureMemo:
    """In-process feature store shared by evaluators: per key and split, the rows fetched so far (sorted indices);
    a request fetches only indices it has not seen. Keys name (model, task, resolution, representation)."""

    def __init__(self) -> None:
        self._rows: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def features(self, fetch: EmbedFn, split: str, indices: np.ndarray, *, key: tuple) -> np.ndarray:
        """Features of ``indices`` (in the order given); rows missing here come from ``fetch(split, missing)``."""
        indices = np.asarray(indices, dtype=np.int64)
        have_idx, have = self._rows.get((key, split), (np.zeros(0, np.int64), None))
        missing = np.setdiff1d(np.unique(indices), have_idx, assume_unique=True)
        if missing.size:
            new = np.asarray(fetch(split, missing), dtype=np.float32)
            if new.shape[0] != missing.size:
                raise ValueError(f"embed_fn returned {new.shape[0]} rows for {missing.size} indices")
            all_idx = np.concatenate([have_idx, missing])
            all_feats = new if have is None else np.concatenate([have, new], axis=0)
            order = np.argsort(all_idx, kind="stable")
            have_idx, have = all_idx[order], all_feats[order]
            self._rows[(key, split)] = (have_idx, have)
        if have is None:  # an empty request before anything was fetched
            return np.zeros((0, 0), np.float32)
        return have[np.searchsorted(have_idx, indices)]

    def clear(self) -> None:
        """Drop every stored row (frees the memory)."""
        self._rows.clear()


def _root(task: Any) -> tuple[Any, Callable[[str, np.ndarray], tuple[str, np.ndarray]]]:
    """(the task at the bottom of a chain of views, map (split, indices) of ``task`` to that task's)."""
    chain = []
    while hasattr(task, "base") and hasattr(task, "source"):
        chain.append(task)
        task = task.base

    def to_root(split: str, indices: np.ndarray) -> tuple[str, np.ndarray]:
        for view in chain:
            split, indices = view.source(split, indices)
        return split, np.asarray(indices, dtype=np.int64)

    return task, to_root


def _bind(embed_fn: EmbedFn, task: Any, representation: str, *, cache: FeatureCache | None, model_key: str | None,
          resolution: int | str | None, memo: FeatureMemo) -> EmbedFn:
    """``embed_fn`` (over ``task``'s images) behind the memo and the cache, keyed by the root task of a view."""
    root, to_root = _root(task)
    key = (model_key, root.name, resolution, representation)

    def bound(split: str, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64)
        root_split, root_idx = to_root(split, idx)
        order = np.argsort(root_idx, kind="stable")

        def embed_root(_: str, want: np.ndarray) -> np.ndarray:
            # ``want`` is a subset of root_idx: embed those images through the caller's fn, in this task's terms.
            return embed_fn(split, idx[order[np.searchsorted(root_idx[order], want)]])

        fetch = embed_root if cache is None else cache.bind(embed_root, model_key=model_key, task=root.name,
                                                            resolution=resolution, representation=representation)
        return memo.features(fetch, root_split, root_idx, key=key)

    return bound


def _check_key(type_: str, cache: FeatureCache | None, memo: FeatureMemo | None, model_key: str | None) -> None:
    if (cache is not None or memo is not None) and not model_key:
        raise ValueError(f"{type_} evaluation with a feature cache or a shared memo needs a model_key")


def run_evaluator(
    type_: str,
    embed_fn: EmbedFn,
    task: Any,
    cfg: Any = None,
    *,
    cache: FeatureCache | None = None,
    model_key: str | None = None,
    resolution: int | str | None = None,
    memo: FeatureMemo | None = None,
) -> Iterator[tuple[str, float]]:
    """Evaluator ``type_``'s ``(name, value)`` pairs on ``task`` (an iterator; the type, config and key are
    checked at the call, the evaluation runs as it is iterated).

    ``embed_fn`` embeds ``task``'s images (``make_embed_fn(model, task, ...)``) as ``cfg.representation``.
    ``cache`` and ``resolution`` key the persistent features; ``memo`` shares fetched features with other calls
    (pass the same one for a task and its validation view). Both need ``model_key``.
    """
    ev, conf = _evaluator(type_), evaluator_config(type_, cfg)
    _check_key(type_, cache, memo, model_key)
    # Without cache or shared memo, the memo lives for this call only: the embed_fn itself identifies the model.
    bound = _bind(embed_fn, task, conf.representation, cache=cache, model_key=model_key or f"embed-{id(embed_fn)}",
                  resolution=resolution, memo=FeatureMemo() if memo is None else memo)
    return ev.metrics(bound, task, conf)


def run_evaluators(
    evaluators: Sequence[tuple[str, Any]],
    embed_fn: EmbedFn,
    task: Any,
    *,
    cache: FeatureCache | None = None,
    model_key: str | None = None,
    resolution: int | str | None = None,
    memo: FeatureMemo | None = None,
) -> Iterator[tuple[str, float]]:
    """:func:`run_evaluator` for each ``(type, cfg)`` in order, sharing one memo (each split is read from the cache
    or embedded once for all of them). Every config is checked at the call, before anything is embedded."""
    confs = [(t, evaluator_config(t, c)) for t, c in evaluators]
    for t, _ in confs:
        _check_key(t, cache, memo, model_key)
    shared = FeatureMemo() if memo is None else memo
    key = model_key or f"embed-{id(embed_fn)}"

    def gen() -> Iterator[tuple[str, float]]:
        for t, conf in confs:
            yield from run_evaluator(t, embed_fn, task, conf, cache=cache, model_key=key, resolution=resolution,
                                     memo=shared)

    return gen()
