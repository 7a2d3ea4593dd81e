"""The paper's analysis figures (§4.5, Figure 7) and the evaluation curves, as PNG files.

Every function writes one PNG (a local path or any fsspec URL) and returns a :class:`FigureResult`: the path and
scalar summaries worth logging next to it (e.g. mean attention distance per layer). Figures are drawn on
``matplotlib.figure.Figure`` objects with the Agg canvas, never through pyplot's global state, so they are safe in
worker processes and threads and leave the caller's backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import fsspec
import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from . import vit_stats

__all__ = [
    "FigureResult",
    "attention_distance",
    "attention_rollout",
    "embedding_filters",
    "fewshot_curve",
    "fewshot_vs_step",
    "finetune_curves",
    "model_figures",
    "posemb_similarity",
]

DPI = 120


class FigureResult(NamedTuple):
    """A written figure: where it is and the scalars it summarises (metric name -> value)."""

    path: str
    metrics: dict[str, float]


def _save(fig: Figure, out_png: str | Path) -> str:
    out = str(out_png)
    fs, path = fsspec.core.url_to_fs(out)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=DPI, bbox_inches="tight")
    return out


def _patch_kernel(model: torch.nn.Module) -> torch.Tensor:
    proj = getattr(model.patch_embed, "proj", None)
    w = getattr(proj, "weight", None)
    if w is None or w.ndim != 4 or w.shape[1] != 3 or getattr(model.patch_embed, "backbone", None) is not None:
        raise ValueError("embedding_filters needs a plain ViT whose patch embedding is a conv on RGB pixels "
                         "(hybrid models embed ResNet features, not pixels)")
    return w


def embedding_filters(model: torch.nn.Module, out_png: str | Path, n: int = 28) -> FigureResult:
    """RGB embedding filters: the first ``n`` principal components of the patch-projection kernels (Fig. 7 left)."""
    w = _patch_kernel(model)
    n = min(n, w.shape[0], w[0].numel())
    comps, ratio = vit_stats.filter_principal_components(w, n)
    cols = min(n, 7)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.3 * cols, 1.45 * rows + 0.6))
    p = w.shape[-1]
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        c = comps[i].permute(1, 2, 0).numpy()
        c = (c - c.min()) / max(float(c.max() - c.min()), 1e-12)  # each component min-max scaled for display
        ax.imshow(c, interpolation="nearest")
        ax.set_title(f"PC{i + 1} ({100 * ratio[i]:.1f}%)", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"Patch-embedding filters ({p}x{p} RGB): first {n} principal components, "
                 f"{100 * float(ratio.sum()):.0f}% of variance\n(% = share of filter variance per component)",
                 fontsize=9)
    metrics = {f"filters/explained_var_pc{i + 1}": float(ratio[i]) for i in range(min(n, 5))}
    metrics["filters/explained_var_total"] = float(ratio.sum())
    return FigureResult(_save(fig, out_png), metrics)


def posemb_similarity(model: torch.nn.Module, out_png: str | Path) -> FigureResult:
    """Position-embedding similarity (Fig. 7 centre): tile (r, c) shows the cosine similarity of patch (r, c)'s
    position embedding to every other patch's, laid out on the patch grid."""
    gh, gw = model.grid_size
    sim = vit_stats.posemb_cosine_similarity(model.pos_embed, model.num_prefix_tokens, (gh, gw)).numpy()
    # One mosaic image with NaN gutters: one imshow call however large the grid (224/16 gives 196 tiles).
    mosaic = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
    for r in range(gh):
        for c in range(gw):
            mosaic[r * (gh + 1) : r * (gh + 1) + gh, c * (gw + 1) : c * (gw + 1) + gw] = sim[r, c]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    fig = Figure(figsize=(7.2, 6.4))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(mosaic, cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    every = max(1, gw // 8)
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in range(0, gw, every)], [str(c + 1) for c in range(0, gw, every)])
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in range(0, gh, every)], [str(r + 1) for r in range(0, gh, every)])
    ax.set_xlabel("Input patch column")
    ax.set_ylabel("Input patch row")
    ax.set_title(f"Position embedding similarity ({gh}x{gw} patches)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="Cosine similarity")
    dist = vit_stats.patch_distances((gh, gw), 1).numpy()
    flat = sim.reshape(gh * gw, gh * gw)
    neighbour = np.isclose(dist, 1.0)
    far = dist > 1.5
    metrics = {
        "posemb/sim_neighbours": float(flat[neighbour].mean()) if neighbour.any() else float("nan"),
        "posemb/sim_far": float(flat[far].mean()) if far.any() else float("nan"),
    }
    return FigureResult(_save(fig, out_png), metrics)


@torch.inference_mode()
def _attention(model: torch.nn.Module, images: torch.Tensor, batch_size: int):
    model.eval()
    device = next(model.parameters()).device
    for i in range(0, images.shape[0], batch_size):
        _, attns = model.forward_features(images[i : i + batch_size].to(device), return_attn=True)
        yield [a.cpu() for a in attns]


def _check_images(model: torch.nn.Module, images: torch.Tensor) -> None:
    h, w = model.grid_size[0] * model.cfg.patch_size, model.grid_size[1] * model.cfg.patch_size
    if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (h, w) or images.shape[0] < 1:
        raise ValueError(f"images must be a (B, 3, {h}, {w}) float batch for this model, got {tuple(images.shape)}")


def attention_distance(model: torch.nn.Module, images: torch.Tensor, out_png: str | Path,
                       batch_size: int = 16) -> FigureResult:
    """Mean attention distance per head vs depth, in pixels (Fig. 7 right), over a batch of images."""
    _check_images(model, images)
    grid, p, prefix = model.grid_size, model.cfg.patch_size, model.num_prefix_tokens
    total, count = None, 0
    for attns in _attention(model, images, batch_size):
        b = attns[0].shape[0]
        d = vit_stats.mean_attention_distance(attns, grid, p, prefix) * b
        total, count = (d if total is None else total + d), count + b
    dist = (total / count).numpy()  # (layers, heads)
    layers, heads = dist.shape
    uniform = float(vit_stats.patch_distances(grid, p).mean())
    fig = Figure(figsize=(7.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    cmap = matplotlib.colormaps["tab20" if heads > 10 else "tab10"]
    depth = np.arange(1, layers + 1)
    for h in range(heads):
        ax.scatter(depth, dist[:, h], s=22, color=cmap(h % cmap.N), label=f"head {h + 1}", zorder=3)
    ax.plot(depth, dist.mean(axis=1), "k--", lw=1.2, label="mean over heads", zorder=2)
    ax.axhline(uniform, color="grey", lw=1, ls=":", label="uniform attention")
    ax.set_xlabel("Network depth (layer)")
    ax.set_ylabel("Mean attention distance (pixels)")
    ax.set_title(f"Mean attention distance per head ({images.shape[0]} images, {p}px patches)")
    ax.set_xticks(depth)
    ax.set_ylim(0, max(float(dist.max()), uniform) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if heads > 6 else 1, loc="center left", bbox_to_anchor=(1.01, 0.5))
    metrics = {f"attn_dist/layer{i + 1}": float(dist[i].mean()) for i in range(layers)}
    metrics["attn_dist/uniform"] = uniform
    return FigureResult(_save(fig, out_png), metrics)


def _denormalise(images: torch.Tensor) -> np.ndarray:
    # Inputs are normalised to [-1, 1] (big_vision's value_range(-1, 1)); show them in [0, 1].
    return ((images.detach().float().cpu() + 1.0) / 2.0).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def attention_rollout(model: torch.nn.Module, images: torch.Tensor, out_png: str | Path, max_images: int = 8,
                      denormalise: Callable[[torch.Tensor], np.ndarray] = _denormalise) -> FigureResult:
    """Attention rollout of the class token over each image (Fig. 6 / §4.5): input above, overlay below."""
    _check_images(model, images)
    images = images[:max_images]
    (attns,) = list(_attention(model, images, images.shape[0]))
    maps = vit_stats.attention_rollout_maps(attns, model.grid_size, model.num_prefix_tokens)
    up = torch.nn.functional.interpolate(maps[:, None], size=images.shape[-2:], mode="bilinear",
                                         align_corners=False)[:, 0]
    up = up / up.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
    shown = denormalise(images)
    b = images.shape[0]
    fig = Figure(figsize=(1.9 * b + 0.8, 4.3))
    for i in range(b):
        top = fig.add_subplot(2, b, i + 1)
        top.imshow(shown[i], interpolation="nearest")
        bottom = fig.add_subplot(2, b, b + i + 1)
        bottom.imshow(shown[i], interpolation="nearest")
        im = bottom.imshow(up[i].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        top.set_title(f"image {i + 1}", fontsize=8)
    fig.axes[0].set_ylabel("input")
    fig.axes[1].set_ylabel("rollout overlay")
    who = "class token" if model.num_prefix_tokens else "mean over patch tokens (no class token)"
    fig.suptitle(f"Attention rollout of the {who}, {len(attns)} layers", fontsize=10)
    fig.colorbar(im, ax=fig.axes, fraction=0.02, pad=0.02, label="relative attention")
    flat = maps.flatten(1)
    metrics = {"rollout/peak_over_mean": float((flat.amax(1) / flat.mean(1).clamp_min(1e-12)).mean())}
    return FigureResult(_save(fig, out_png), metrics)


def fewshot_curve(results_by_model: Mapping[str, Mapping[int, tuple[float, float]]], out_png: str | Path,
                  task: str, num_classes: int | None = None, split: str = "test") -> FigureResult:
    """Few-shot linear-probe accuracy vs shots per class, one line per model (e.g. pretrained vs random init).

    ``results_by_model[name][k] = (mean, std)`` accuracies in [0, 1] (``fewshot.summarize`` gives this shape);
    ``split`` names what they were scored on (``test``, or ``validation`` for a validation view).
    """
    if not results_by_model or not any(results_by_model.values()):
        raise ValueError("fewshot_curve needs at least one model with results")
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    all_k: set[int] = set()
    metrics: dict[str, float] = {}
    for name, res in results_by_model.items():
        ks = sorted(res)
        mean = np.array([res[k][0] for k in ks]) * 100
        std = np.array([res[k][1] for k in ks]) * 100
        ax.errorbar(ks, mean, yerr=std, marker="o", capsize=3, label=name)
        all_k.update(ks)
        metrics.update({f"{name}/{k}shot": float(res[k][0]) for k in ks})
    if num_classes:
        ax.axhline(100 / num_classes, color="grey", ls=":", label=f"chance (1/{num_classes})")
    ax.set_xscale("log")
    ax.set_xticks(sorted(all_k), [str(k) for k in sorted(all_k)])
    ax.minorticks_off()
    ax.set_xlabel("Training images per class (shots)")
    ax.set_ylabel(f"{split.capitalize()} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{task}: few-shot linear probe (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return FigureResult(_save(fig, out_png), metrics)


def fewshot_vs_step(curves: Mapping[str, Mapping[int, Sequence[tuple[float, float, float]]]], out_png: str | Path,
                    split: str = "validation", baselines: Mapping[str, Mapping[int, float]] | None = None
                    ) -> FigureResult:
    """Few-shot accuracy against the pretraining step, one panel per task, one line per shot count, error bars the
    spread over the few-shot seeds (the paper's Figure 3/4 style, against training progress).

    ``curves[task][k] = [(step, mean, std), ...]`` accuracies in [0, 1] (``vitpipe.jobs.train.evaluation.curves``
    gives this shape); ``baselines[task][k]`` draws a dotted level per shot count (e.g. another run's final value).
    Metrics: ``<task>/<k>shot/final`` and ``<task>/<k>shot/best`` (the last and the highest point).
    """
    tasks = [t for t, by_k in curves.items() if any(len(v) for v in by_k.values())]
    if not tasks:
        raise ValueError("fewshot_vs_step needs at least one task with points")
    cols = min(3, len(tasks))
    rows = math.ceil(len(tasks) / cols)
    fig = Figure(figsize=(5.0 * cols, 3.8 * rows), layout="constrained")
    cmap = matplotlib.colormaps["viridis"]
    metrics: dict[str, float] = {}
    for j, task in enumerate(tasks):
        ax = fig.add_subplot(rows, cols, j + 1)
        ks = sorted(curves[task])
        for i, k in enumerate(ks):
            pts = np.asarray(sorted(curves[task][k]), dtype=float).reshape(-1, 3)
            if not len(pts):
                continue
            color = cmap(i / max(1, len(ks) - 1) * 0.9)
            ax.errorbar(pts[:, 0], pts[:, 1] * 100, yerr=pts[:, 2] * 100, marker="o", ms=3, capsize=3,
                        color=color, label=f"{k}-shot")
            if baselines and k in baselines.get(task, {}):
                ax.axhline(100 * baselines[task][k], color=color, ls=":", lw=1)
            metrics[f"{task}/{k}shot/final"] = float(pts[-1, 1])
            metrics[f"{task}/{k}shot/best"] = float(pts[:, 1].max())
        ax.set_xlabel("Pretraining step")
        ax.set_ylabel(f"{split.capitalize()} accuracy (%)")
        ax.set_title(task, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Few-shot linear probe during pretraining ({split}; mean ± std over seeds)", fontsize=10)
    return FigureResult(_save(fig, out_png), metrics)


def _kind(name: str) -> str:
    last = name.rsplit("/", 1)[-1].lower()
    for kind in ("loss", "acc", "lr"):
        if kind in last:
            return {"acc": "accuracy", "lr": "learning rate"}.get(kind, kind)
    return last


def finetune_curves(history: Mapping[str, Sequence[tuple[float, float]]], out_png: str | Path,
                    title: str = "Fine-tuning") -> FigureResult:
    """Training curves, one panel per kind of metric (loss, accuracy, learning rate, ...), one line per series.

    ``history["lr=0.01/train_loss"] = [(step, value), ...]``; noisy series (> 50 points) also get a moving-average line.
    """
    series = {k: np.asarray(v, dtype=float).reshape(-1, 2) for k, v in history.items() if len(v)}
    if not series:
        raise ValueError("finetune_curves needs at least one non-empty series")
    kinds = list(dict.fromkeys(_kind(k) for k in series))
    fig = Figure(figsize=(5.0 * len(kinds), 4.0))
    cmap = matplotlib.colormaps["tab10"]
    metrics: dict[str, float] = {}
    for j, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), j + 1)
        for i, (name, xy) in enumerate((n, s) for n, s in series.items() if _kind(n) == kind):
            color = cmap(i % 10)
            if len(xy) > 50:
                # Centred moving average: unlike an EMA it does not lag the raw curve.
                win = max(5, len(xy) // 25) | 1
                smooth = np.convolve(xy[:, 1], np.ones(win) / win, mode="valid")
                ax.plot(xy[:, 0], xy[:, 1], color=color, alpha=0.25, lw=0.8)
                ax.plot(xy[win // 2 : win // 2 + len(smooth), 0], smooth, color=color,
                        label=f"{name} (mean of {win})")
            else:
                ax.plot(xy[:, 0], xy[:, 1], color=color, marker="o", ms=3, label=name)
            metrics[f"{name}/final"] = float(xy[-1, 1])
        ax.set_xlabel("Step")
        ax.set_ylabel(kind)
        ax.set_title(f"{title}: {kind}")
        if kind == "loss" and all((s[:, 1] > 0).all() for n, s in series.items() if _kind(n) == kind):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return FigureResult(_save(fig, out_png), metrics)


def model_figures(model: torch.nn.Module, images: torch.Tensor, out_dir: str,
                  rollout_images: int = 6) -> dict[str, FigureResult]:
    """All model-introspection figures of Fig. 7 into ``out_dir`` (filters skipped for hybrid models)."""
    out_dir = out_dir.rstrip("/")
    out: dict[str, FigureResult] = {}
    try:
        out["embedding_filters"] = embedding_filters(model, f"{out_dir}/embedding_filters.png")
    except ValueError:
        pass  # hybrid: the first layer sees ResNet features, there are no pixel filters to show
    out["posemb_similarity"] = posemb_similarity(model, f"{out_dir}/posemb_similarity.png")
    out["attention_distance"] = attention_distance(model, images, f"{out_dir}/attention_distance.png")
    out["attention_rollout"] = attention_rollout(model, images, f"{out_dir}/attention_rollout.png",
                                                 max_images=rollout_images)
    return out
