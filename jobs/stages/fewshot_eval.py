"""The fewshot stage's per-task loop: every configured evaluator (few-shot ridge, kNN, linear probe; the registry in
``vitpipe.jobs.evals.registry``) on each task's test split and on its validation view, for each model (pretrained,
random init), at the task's own resolution, with one feature memo per (model, task) so each image is embedded once
for all evaluators and both views.

Selection protocol (paper appendix B.1.1): the validation view ``<task>.val`` is train minus a stratified held-out
slice of train, scored on that slice; it never reads the test split. Numbers on it (and the linear probe's
held-out ``val_acc``) are the ones recipes and hyperparameters may be compared by, the transfer score included;
test numbers are reported, never used to choose (``vitpipe.jobs.evals.transfer.metric_role`` tells them apart).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from vitpipe.jobs.evals.features import EmbedFn, FeatureCache, make_embed_fn
from vitpipe.jobs.evals.fewshot import summarize
from vitpipe.jobs.evals.registry import EVALUATORS, FeatureMemo, run_evaluators
from vitpipe.jobs.evals.transfer import transfer_score

log = logging.getLogger(__name__)

__all__ = ["TaskEvaluation", "check_evaluators", "evaluate_task", "transfer_scores"]

TRANSFER_SHOTS = (10, 25)
"""Shot counts of the transfer score (the paper's headline few-shot numbers)."""


@dataclass
class TaskEvaluation:
    """One task's results for every model."""

    name: str
    """The task's label (``hymenoptera_64px``)."""
    size: int
    """Input resolution it was probed at."""
    raw: dict[str, dict[str, float]] = field(default_factory=dict)
    """Evaluator values by model, the evaluators' own names (``<task>[.val]/<k>shot/mean``, ``.../knn/k20``)."""
    splits: dict[str, dict] = field(default_factory=dict)
    """``split_info()`` of the task and of its validation view, by view name."""
    curves: dict[str, dict[str, dict[int, tuple[float, float]]]] = field(default_factory=dict)
    """``{view name: {model: {k: (mean, std)}}}`` of the few-shot results."""


def check_evaluators(names: tuple[str, ...], field_name: str) -> None:
    """One-line ValueError for an evaluator type the registry does not know."""
    unknown = [n for n in names if n not in EVALUATORS]
    if unknown:
        raise ValueError(f"{field_name} has unknown evaluator {unknown[0]!r}; known: {', '.join(sorted(EVALUATORS))}")


def evaluate_task(spec: str, models: Mapping[str, tuple[torch.nn.Module, str]], mcfg: Any, *,
                  evaluators: Mapping[str, tuple[tuple[str, Any], ...]],
                  validation: Mapping[str, tuple[tuple[str, Any], ...]],
                  img_size: int | None = None, validation_fraction: float | None = None, validation_seed: int = 0,
                  batch_size: int = 256, representation: str = "pre_logits", cache: FeatureCache | None = None,
                  wrap: Callable[[EmbedFn, str], EmbedFn] | None = None) -> TaskEvaluation:
    """Every evaluator of ``evaluators[model]`` on the test split and of ``validation[model]`` on the validation
    view of task ``spec``, for each ``model label -> (model, feature-cache key)`` built from ``mcfg``.

    The resolution is the spec's ``@<res>``, else ``img_size``, else the model's own (position embeddings resized
    with ``model_at_resolution``). ``wrap(embed_fn, description)`` may wrap each embedding function (progress).
    """
    from vitpipe.jobs.evals.taskspec import make_task, model_at_resolution

    task = make_task(spec)
    size = int(task.resolution or img_size or mcfg.img_hw[0])
    out = TaskEvaluation(name=task.name, size=size, splits={task.name: task.split_info()})
    val = task.validation(validation_fraction, validation_seed) if any(validation.values()) else None
    if val is not None:
        out.splits[val.name] = val.split_info()
    for label, (model, key) in models.items():
        m = model_at_resolution(model, mcfg, size)
        memo = FeatureMemo()  # one per (model, task): the validation view reads the features of the task's train
        raw = out.raw.setdefault(label, {})
        for view, evs in ((task, evaluators.get(label, ())), (val, validation.get(label, ()))):
            if view is None or not evs:
                continue
            embed = make_embed_fn(m, view, img_size=size, batch_size=batch_size, representation=representation)
            if wrap is not None:
                embed = wrap(embed, f"{view.name} {label}")
            res = dict(run_evaluators(list(evs), embed, view, cache=cache, model_key=key, resolution=size, memo=memo))
            raw.update(res)
            curve = summarize(res, view.name)
            if curve:
                out.curves.setdefault(view.name, {})[label] = curve
            log.info("fewshot %s %s @%dpx: %s", view.name, label, size,
                     {k: round(v, 4) for k, v in res.items() if k.endswith(("shot/mean", "/test_acc", "/val_acc"))
                      or "/knn/" in k})
        memo.clear()
    return out


def transfer_scores(raw: Mapping[str, Mapping[str, float]], tasks: tuple[str, ...]) -> dict[str, float]:
    """``{model: transfer score}``: the mean 10- and 25-shot validation accuracy over the out-of-domain ``tasks``
    (models whose validation few-shot numbers are incomplete are left out, with a log line)."""
    out: dict[str, float] = {}
    for label, metrics in raw.items():
        try:
            out[label] = transfer_score(metrics, tasks, TRANSFER_SHOTS)
        except ValueError as e:
            log.warning("fewshot: no transfer score for %s: %s", label, e)
    return out
