"""The report's evaluation sections: few-shot, kNN, linear-probe and fine-tune numbers per task side by side, every
column labelled ``val`` (a validation view: held-out slice of train, the numbers selection may use) or ``test`` (the
task's test split: reported, never used to choose), by :func:`vitpipe.jobs.evals.transfer.metric_role`; the
transfer score; how every split was made; the in-training curves' first and last points."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.evals.transfer import metric_role
from vitpipe.pipeline.tasks import VAL_SUFFIX

__all__ = ["evaluation_sections", "table_cells"]

_SHOT = re.compile(r"(\d+)shot/mean")
_KNN = re.compile(r"knn/k(\d+)")
ROLE_TAG = {"validation": "val", "test": "test"}


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


def table_cells(raw: Mapping[str, float]) -> dict[str, dict[tuple[str, str], str]]:
    """``{task: {(column, role tag): text}}`` of one model's evaluator values (their own names, e.g.
    ``cifar10.val/10shot/mean``, ``cifar10/knn/k20``, ``cifar10/linear/test_acc``); roles from ``metric_role``.
    Few-shot cells carry the spread over seeds (``mean ± std``)."""
    out: dict[str, dict[tuple[str, str], str]] = {}
    for name, value in raw.items():
        view, _, rest = name.partition("/")
        role = metric_role(name)
        if role not in ROLE_TAG:
            continue
        task, tag = view.removesuffix(VAL_SUFFIX), ROLE_TAG[role]
        cells = out.setdefault(task, {})
        if m := _SHOT.fullmatch(rest):
            cells[(f"{m.group(1)}-shot", tag)] = f"{_pct(value)} ± {_pct(raw.get(f'{view}/{m.group(1)}shot/std', 0.0))}"
        elif m := _KNN.fullmatch(rest):
            cells[(f"kNN k={m.group(1)}", tag)] = _pct(value)
        elif rest == "linear/test_acc":
            cells[("linear", tag)] = _pct(value)
        elif rest == "linear/val_acc" and ("linear", tag) not in cells:
            # the probe's own held-out slice (the one its L2 was chosen on); a validation view's score wins
            if f"{view}{VAL_SUFFIX}/linear/test_acc" not in raw:
                cells[("linear", tag)] = _pct(value) + "*"
    return out


def _column_order(columns: set[str]) -> list[str]:
    def key(c: str) -> tuple[int, int, str]:
        if c.endswith("-shot"):
            return (0, int(c.split("-")[0]), c)
        if c.startswith("kNN"):
            return (1, int(c.split("=")[1]), c)
        return ({"linear": 2, "fine-tune": 3}.get(c, 4), 0, c)

    return sorted(columns, key=key)


def _finetune_cells(ft: StageResult | None) -> tuple[str | None, dict[tuple[str, str], str]]:
    if ft is None:
        return None, {}
    task = ft.info.get("task_name")
    cells = {}
    if f"eval/{task}/finetune" in ft.metrics:
        cells[("fine-tune", "test")] = _pct(ft.metrics[f"eval/{task}/finetune"])
    grid = [v for k, v in ft.metrics.items() if k.startswith(f"eval/{task}{VAL_SUFFIX}/finetune_lr_")]
    if grid:  # the LR search's held-out accuracy of the chosen LR
        cells[("fine-tune", "val")] = _pct(max(grid))
    return task, cells


def _results_table(few: StageResult, ft: StageResult | None) -> list[str]:
    raw: dict[str, dict[str, float]] = few.info.get("raw", {})
    ood = set(few.info.get("out_of_domain", []))
    ft_task, ft_cells = _finetune_cells(ft)
    rows: list[tuple[str, str, dict[tuple[str, str], str]]] = []
    for model, values in raw.items():
        for task, cells in table_cells(values).items():
            if model == "pretrained" and task == ft_task:
                cells = {**cells, **ft_cells}
            rows.append((task, model, cells))
    if ft_cells and not any(t == ft_task and m == "pretrained" for t, m, _ in rows):
        rows.append((ft_task, "pretrained", ft_cells))
    if not rows:
        return []
    order = {t: i for i, t in enumerate(dict.fromkeys(t for t, _, _ in rows))}
    rows.sort(key=lambda r: (order[r[0]], r[1] != "pretrained", r[1]))
    columns = _column_order({c for _, _, cells in rows for c, _ in cells})
    head = [(c, tag) for c in columns for tag in ("val", "test") if any((c, tag) in r[2] for r in rows)]
    sizes = few.info.get("sizes", {})
    lines = ["## Evaluation", "",
             "`val`: the task's validation view (a held-out slice of its train split; the numbers recipes and "
             "hyperparameters are compared and chosen by). `test`: the task's test split (reported, never used to "
             "choose). Accuracy in %; few-shot mean ± std over seeds; `*` the linear probe's own held-out slice "
             "(where its L2 was chosen); fine-tune `val` the LR search's held-out accuracy.", "",
             "| task | model | " + " | ".join(f"{c} {tag}" for c, tag in head) + " |",
             "|---|---|" + "---|" * len(head)]
    for task, model, cells in rows:
        where = "out-of-domain" if task in ood else "in-domain" if ood else ""
        label = f"{task} ({sizes[task]} px{', ' + where if where else ''})" if task in sizes else task
        lines.append(f"| {label} | {model} | " + " | ".join(cells.get(h, "") for h in head) + " |")
    return lines


def _transfer_lines(few: StageResult) -> list[str]:
    scores = few.info.get("transfer_score") or {}
    tasks = few.info.get("out_of_domain") or []
    if not scores:
        return []
    what = ", ".join(f"{m.replace('_', ' ')} {_pct(v)}%" for m, v in scores.items())
    return ["", f"**Transfer score** (validation: mean 10- and 25-shot accuracy on the validation views of the "
                f"out-of-domain tasks {', '.join(tasks)}): {what}"]


def _describe_split(info: Mapping[str, Any]) -> str:
    kind = info.get("kind")
    if kind == "given":
        return f"given ({info.get('test_source', 'on disk')})"
    if kind == "fixed":
        return f"fixed: {info.get('method', '')}"
    if kind in ("held_out", "validation"):
        return (f"held out of {info.get('from_split')}: {100 * info.get('fraction', 0):g}% per class, seed "
                f"{info.get('seed')}, digest {info.get('held_out_digest')}")
    return str(kind)


def _split_lines(few: StageResult) -> list[str]:
    splits: dict[str, dict] = few.info.get("splits") or {}
    if not splits:
        return []
    lines = ["", "### Splits", "", "| task | test split | validation slice (of train) | train / val / test images |",
             "|---|---|---|---|"]
    for name, info in splits.items():
        if name.endswith(VAL_SUFFIX):
            continue
        val = splits.get(name + VAL_SUFFIX)
        n_train, n_test = info.get("sizes", {}).get("train", 0), info.get("sizes", {}).get("test", 0)
        n_val = val.get("sizes", {}).get("test", 0) if val else 0
        sizes = f"{n_train - n_val} / {n_val} / {n_test}" if val else f"{n_train} / - / {n_test}"
        lines.append(f"| {name} | {_describe_split(info)} | {_describe_split(val) if val else 'none'} | {sizes} |")
    return lines


def _in_training_lines(pre: StageResult | None) -> list[str]:
    if pre is None or "evals" not in pre.artifacts:
        return []
    from vitpipe.jobs.train.evaluation import curves, read_evals

    rec = read_evals(pre.url)
    if not rec or not rec.get("points"):
        return []
    role = "validation" if rec.get("settings", {}).get("split") == "validation" else "test"
    cells = []
    for task, by_k in curves(rec).items():
        k = 10 if 10 in by_k else max(by_k)
        pts = by_k[k]
        cells.append(f"{task} {k}-shot {_pct(pts[0][1])}% (step {pts[0][0]}) → {_pct(pts[-1][1])}% "
                     f"(step {pts[-1][0]})")
    secs = [p.get("seconds", 0.0) for p in rec["points"]]
    return ["", f"In-training few-shot ({role}, up to {rec['settings'].get('test_limit') or 'all'} images per task, "
                f"{len(rec['points'])} points, {sum(secs):.0f}s in all): " + "; ".join(cells)]


def evaluation_sections(results: Mapping[str, StageResult]) -> list[str]:
    """Markdown lines of the evaluation part of the report (empty without a fewshot result)."""
    few, ft, pre = results.get("fewshot"), results.get("finetune"), results.get("pretrain")
    lines: list[str] = []
    if few:
        lines += _results_table(few, ft) + _transfer_lines(few) + _split_lines(few)
    lines += _in_training_lines(pre)
    return lines
