"""Scaling-study views of a grid of pipeline runs: the paper's Figure 5 layout (transfer accuracy vs total
pretraining compute) and Figure 3/4 layout (accuracy vs pretraining data size, one line per model size), plus a
CSV / markdown table of every point.

Input is one row per point, a flat dict built by the sweep (``vitpipe.jobs.run.sweep``) from each point's config
and stage results with the helpers here: ``pretrain_compute`` (``vitpipe.models.flops`` train FLOPs per image x
images seen), ``transfer_columns`` (few-shot and fine-tune accuracies per task), ``variant_label`` /
``model_family`` (names for legends). Pure matplotlib / numpy: no Ray, MLflow or DeepSpeed.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
from collections import defaultdict
from typing import Any, Iterable

from vitpipe.jobs.core.store import StageResult
from vitpipe.models import ViTConfig
from vitpipe.models.config import VARIANTS
from vitpipe.models.flops import flops

EXA = 1e18
FAMILY_MARKERS = {"ViT": "o", "Hybrid": "^", "ResNet": "s"}
"""One marker style per model family (the paper's Figure 5: ViT circles, hybrids triangles, BiT squares)."""
FIRST_COLUMNS = ("point", "status", "model", "family", "params", "data_size", "epochs", "images_seen",
                 "compute_eflops")


def variant_label(m: ViTConfig) -> str:
    """``"Ti/4"`` for a table size (``"R50+Ti/16"`` for a hybrid); else ``"w192d6/4"`` (width, depth / patch)."""
    size = next((name for name, v in VARIANTS.items() if (m.width, m.depth, m.mlp_dim, m.num_heads) ==
                 (v["width"], v["depth"], v["mlp_dim"], v["num_heads"])), None)
    label = f"{size}/{m.patch_size}" if size else f"w{m.width}d{m.depth}/{m.patch_size}"
    if m.hybrid is not None:
        label = f"R{sum(3 * n for n in m.hybrid.layers) + 2}+{label}"
    return label


def model_family(m: ViTConfig) -> str:
    return "Hybrid" if m.hybrid is not None else "ViT"


def pretrain_compute(m: ViTConfig, steps: int, global_batch: int) -> float:
    """Total pretraining FLOPs: ``flops(m)["train_flops"]`` (forward + backward per image) x steps x batch."""
    return float(flops(m)["train_flops"]) * int(steps) * int(global_batch)


def transfer_columns(results: dict[str, StageResult]) -> dict[str, float]:
    """Test accuracies in [0, 1] of the pretrained model: ``fewshot/<task>/<k>shot`` (mean over the probe's seeds)
    with its ``.../std``, and ``finetune/<task>``. Reads the stages' ``eval/<task>/<k>shot[_std]`` and
    ``eval/<task>/finetune`` metrics (``vitpipe.jobs.core.metric_names``; validation views ``<task>.val`` and
    baselines ``eval/<task>/<model>/...`` are left out), and the older ``pretrained/<task>/<k>shot/mean`` form."""
    out: dict[str, float] = {}
    for stage in ("fewshot", "finetune"):
        res = results.get(stage)
        for name, value in (res.metrics if res is not None else {}).items():
            m = _EVAL.fullmatch(name) or _OLD_FEWSHOT.fullmatch(name)
            if m is None or m["task"].endswith(".val"):
                continue
            if m["what"] == "finetune":
                out[f"finetune/{m['task']}"] = float(value)
            else:
                out[f"fewshot/{m['task']}/{m['what']}" + ("/std" if m["std"] else "")] = float(value)
    ft = results.get("finetune")
    if ft is not None and "test_acc" in ft.metrics and not any(k.startswith("finetune/") for k in out):
        task = str(ft.info.get("task", "finetune")).partition("=")[0] or "finetune"
        out[f"finetune/{task}"] = float(ft.metrics["test_acc"])
    return out


_EVAL = re.compile(r"eval/(?P<task>[^/]+)/(?P<what>\d+shot|finetune)(?P<std>_std)?")
_OLD_FEWSHOT = re.compile(r"pretrained/(?P<task>[^/]+)/(?P<what>\d+shot)/(?:mean|(?P<std>std))")


def metric_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    """The accuracy columns present in any row, few-shot (by task, then k) before fine-tune."""
    cols = {k for r in rows for k in r if k.startswith(("fewshot/", "finetune/")) and not k.endswith("/std")}

    def order(c: str) -> tuple:
        parts = c.split("/")
        return (parts[0] != "fewshot", parts[1], int(parts[2][:-4]) if parts[0] == "fewshot" else 0)

    return sorted(cols, key=order)


def headline_columns(rows: list[dict[str, Any]]) -> list[str]:
    """One panel per task and kind: the largest-k few-shot accuracy of each task, and each fine-tune task."""
    best: dict[str, str] = {}
    for c in metric_columns(rows):
        parts = c.split("/")
        best[f"{parts[0]}/{parts[1]}"] = c  # sorted by k: the last one wins
    return list(best.values())


# ------------------------------------------------------------------------------------------------- the table
def table_columns(rows: list[dict[str, Any]], coords: list[str]) -> list[str]:
    metrics = metric_columns(rows)
    stds = [f"{c}/std" for c in metrics if any(f"{c}/std" in r for r in rows)]
    return [*FIRST_COLUMNS[:2], *coords, *FIRST_COLUMNS[2:], *metrics, *stds, "run_id"]


def table_csv(rows: list[dict[str, Any]], coords: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=table_columns(rows, coords), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in r.items()})
    return buf.getvalue()


def _cell(col: str, v: Any, row: dict[str, Any]) -> str:
    if v is None or v == "":
        return ""
    if col.startswith(("fewshot/", "finetune/")):
        std = row.get(f"{col}/std")
        return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if std is not None else "")
    if col == "compute_eflops":
        return f"{v:.3g}"
    if col == "epochs":
        return f"{v:.2f}"
    if isinstance(v, int) and col in ("params", "images_seen", "data_size"):
        return f"{v:,}"
    return str(v)


def table_markdown(rows: list[dict[str, Any]], coords: list[str]) -> str:
    """Every point, accuracies in % (few-shot: mean ± std over the probe's seeds)."""
    cols = [c for c in table_columns(rows, coords) if not c.endswith("/std")]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(c, r.get(c), r) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ the figures
def _title(col: str) -> str:
    kind, task, *rest = col.split("/")
    return f"{task} {rest[0]}" if kind == "fewshot" else f"{task} fine-tune"


def _grid(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.6 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _colors(labels: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return {lab: cmap(i / max(1, len(labels) - 1) * 0.85) for i, lab in enumerate(labels)}


def _model_order(rows: list[dict[str, Any]]) -> list[str]:
    params = {}
    for r in rows:
        params.setdefault(r["model"], r.get("params") or 0)
    return sorted(params, key=lambda m: (params[m], m))


def figure_compute(rows: list[dict[str, Any]], path: str) -> str | None:
    """Figure 5 layout: each point's transfer accuracy vs its total pretraining compute (exaFLOPs, log x), one
    marker per model family, one colour per model size; one panel per task (largest-k few-shot, fine-tune)."""
    cols = headline_columns(rows)
    if not cols:
        return None
    plt, fig, axes = _grid(len(cols))
    colors = _colors(_model_order(rows))
    for ax, col in zip(axes, cols):
        seen = set()
        for r in rows:
            if r.get(col) is None or not r.get("compute_eflops"):
                continue
            key = (r["family"], r["model"])
            ax.scatter(r["compute_eflops"], 100 * r[col], marker=FAMILY_MARKERS.get(r["family"], "s"),
                       color=colors[r["model"]], s=42, edgecolor="black", linewidth=0.5,
                       label=f"{r['family']} {r['model']}" if key not in seen else None)
            seen.add(key)
        _log_x(ax)
        ax.set_xlabel("total pretraining compute [exaFLOPs]")
        ax.set_ylabel("accuracy [%]")
        ax.set_title(_title(col))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("Transfer accuracy vs pretraining compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_x(ax) -> None:
    """Log x axis labelled at 1, 2, 5 x 10^k inside the data's range (matplotlib's own minor labels overprint
    when the range is about a decade)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    ticks = [t for t in LogLocator(subs=(1.0, 2.0, 5.0)).tick_values(lo, hi) if lo <= t <= hi]
    if len(ticks) > 6:  # several decades: powers of ten are enough
        ticks = [t for t in ticks if math.isclose(math.log10(t), round(math.log10(t)))] or ticks
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(_tick_label))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _tick_label(v: float, _pos=None) -> str:
    if 1e3 <= v < 1e7:
        return f"{v / 1e3:g}k"
    if 1 <= v < 1e3:
        return f"{v:g}"
    e = math.floor(math.log10(v))
    m = round(v / 10 ** e, 3)
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0)


def figure_data(rows: list[dict[str, Any]], path: str) -> str | None:
    """Figure 3/4 layout: accuracy vs pretraining data size (images, log x), one line per model size; points that
    differ only by seed axes are averaged (error bar: their std; a single point shows the probe seeds' std)."""
    cols = headline_columns(rows)
    if not cols:
        return None
    plt, fig, axes = _grid(len(cols))
    models = _model_order(rows)
    colors = _colors(models)
    for ax, col in zip(axes, cols):
        for m in models:
            by_size: dict[int, list[dict[str, Any]]] = defaultdict(list)
            for r in rows:
                if r["model"] == m and r.get(col) is not None and r.get("data_size"):
                    by_size[int(r["data_size"])].append(r)
            if not by_size:
                continue
            xs = sorted(by_size)
            ys, es = [], []
            for x in xs:
                group = by_size[x]
                mean, std = _mean_std([100 * g[col] for g in group])
                if len(group) == 1 and group[0].get(f"{col}/std") is not None:
                    std = 100 * group[0][f"{col}/std"]
                ys.append(mean)
                es.append(std)
            family = rows[[r["model"] for r in rows].index(m)]["family"]
            ax.errorbar(xs, ys, yerr=es, marker=FAMILY_MARKERS.get(family, "s"), color=colors[m], capsize=3,
                        label=m)
        _log_x(ax)
        ax.set_xlabel("pretraining data size [images]")
        ax.set_ylabel("accuracy [%]")
        ax.set_title(_title(col))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="best", title="model")
    fig.suptitle("Accuracy vs pretraining data size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], coords: list[str], out_dir: str) -> dict[str, str]:
    """``points.csv``, ``points.md`` and the two figures (when any point has an accuracy) in the local folder
    ``out_dir``; returns {name: path}."""
    os.makedirs(out_dir, exist_ok=True)
    out = {}
    for name, text in (("points.csv", table_csv(rows, coords)), ("points.md", table_markdown(rows, coords))):
        out[name] = os.path.join(out_dir, name)
        with open(out[name], "w") as f:
            f.write(text)
    finished = [r for r in rows if r.get("status") == "FINISHED"]
    for name, fn in (("compute_vs_transfer.png", figure_compute), ("data_vs_accuracy.png", figure_data)):
        if fn(finished, os.path.join(out_dir, name)):
            out[name] = os.path.join(out_dir, name)
    return out
