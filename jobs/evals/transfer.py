"""Selection protocol helpers: which numbers are validation and which test, and the transfer score.

Recipes and hyperparameters are compared on validation numbers only: probes on a task's validation view
(``<task>.val``: train minus a held-out slice of train, scored on that slice) and the linear probe's held-out
``val_acc``. Test numbers are reported, never used to choose (paper appendix B.1.1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vitpipe.pipeline.tasks import VAL_SUFFIX

__all__ = ["metric_role", "transfer_score", "validation_name"]

_SETTINGS = ("l2", "holdout_size")


def validation_name(task: str) -> str:
    """Name of ``task``'s validation view (what ``task.validation()`` is called): ``cifar10`` -> ``cifar10.val``."""
    return task if task.endswith(VAL_SUFFIX) else task + VAL_SUFFIX


def metric_role(name: str) -> str:
    """``"validation"``, ``"test"`` or ``"setting"`` for an evaluator metric name (any prefix such as
    ``pretrained/`` allowed): ``validation`` if it is computed on a validation view or is a held-out ``val_acc``;
    ``setting`` for chosen hyperparameters and sizes (``.../linear/l2``, ``.../holdout_size``,
    ``.../loo/l2_seed<s>``); otherwise ``test``."""
    parts = name.split("/")
    if any(p.endswith(VAL_SUFFIX) for p in parts[:-1]) or parts[-1] == "val_acc":
        return "validation"
    if parts[-1] in _SETTINGS or parts[-1].startswith("l2_seed"):
        return "setting"
    return "test"


def transfer_score(metrics: Mapping[str, float], tasks: Sequence[str], shots: Sequence[int] = (10, 25), *,
                   prefix: str = "") -> float:
    """Mean over the out-of-domain ``tasks`` and ``shots`` of the few-shot validation accuracy
    ``<prefix><task>.val/<k>shot/mean`` (each task weighs the same). Raises a one-line error naming the first
    missing metrics, so a score is never computed from part of the tasks."""
    if not tasks or not shots:
        raise ValueError(f"transfer_score needs at least one task and one shot count, got {list(tasks)}, {list(shots)}")
    names = [f"{prefix}{validation_name(t)}/{int(k)}shot/mean" for t in tasks for k in shots]
    missing = [n for n in names if n not in metrics]
    if missing:
        raise ValueError(f"transfer_score: {len(missing)} validation metric(s) missing, e.g. {missing[:3]} "
                         "(run the fewshot evaluator on each task's validation view)")
    return float(np.mean([metrics[n] for n in names]))
