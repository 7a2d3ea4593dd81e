"""Metric names: one scheme for every stage, so that MLflow's run pages read in sections by prefix.

MLflow (3.17) makes one chart section of every name up to its last ``/``, sorts the sections by name, keeps bare
names in a last "Model metrics" section and shows ``system/...`` names on a run's "System metrics" tab:

- ``train/<m>``: a training loop, per logged step (``train/loss``, ``train/lr``, ``train/images_per_s``, ...);
- ``eval/<task>/<result>``: evaluation results, e.g. ``eval/cifar10/10shot`` (mean over the shot seeds),
  ``eval/cifar10/10shot_std``, ``eval/cifar10/finetune`` (fine-tuned test accuracy); a baseline model's under
  ``eval/<task>/<model>/...``, a task's validation view (held-out train images) as ``eval/<task>.val/...``;
- ``train/data/<m>``: the training input stream (``train/data/wait_frac``, per-source sample counts, ...): a
  section of its own that sorts right after ``train`` (a top-level ``data/`` would sort first);
- ``system/<m>``: MLflow's own CPU / memory / GPU sampling, per-rank memory peaks, ``system/stage_seconds``.

A stage's result metrics go to its own run and, once, to the pipeline's parent run (:func:`parent_metrics`).
"""

from __future__ import annotations

import re

STAGE_SECONDS = "system/stage_seconds"
"""Wall time of a stage that ran (its run; the parent has ``system/stage_seconds/<stage>``)."""

_PER_SEED = re.compile(r"(l2_)?seed\d+")


def eval_metrics(results: dict[str, float], model: str | None = None) -> dict[str, float]:
    """An evaluator's ``<task>/<name>`` results as ``eval/<task>[/<model>]/<name>``: a trailing ``/mean`` is
    dropped and inner ``/`` become ``_`` (``cifar10/10shot/mean`` -> ``eval/cifar10/10shot``, ``cifar10/10shot/std``
    -> ``eval/cifar10/10shot_std``, ``cifar10/knn/k20`` -> ``eval/cifar10/knn_k20``). Per-seed values
    (``.../seed<s>``, ``.../l2_seed<s>``) are left out: the mean and spread summarise them."""
    out: dict[str, float] = {}
    for name, value in results.items():
        task, _, rest = name.partition("/")
        if not rest:
            raise ValueError(f"evaluator metric {name!r} is not <task>/<name>")
        parts = rest.split("/")
        if _PER_SEED.fullmatch(parts[-1]):
            continue
        if parts[-1] == "mean":
            parts = parts[:-1]
        out["/".join(["eval", task, *([model] if model else []), "_".join(parts)])] = value
    return out


def parent_metrics(stage_metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """What the parent run shows of its stages' results (``{stage: metrics}``): a name with a section prefix as it
    is (``eval/cifar10/10shot``), a bare one under its stage (``ingest/num_samples``); non-numbers left out."""
    out: dict[str, float] = {}
    for stage, metrics in stage_metrics.items():
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k if "/" in k else f"{stage}/{k}"] = float(v)
    return out
