"""Input normalisation folded into a ViT's patch embedding.

A model trained on ``(u - mean) / std`` inputs (``u`` pixels in [0, 1], per-channel statistics of its pretraining
data) is rewritten to take every other consumer's ``(u - 0.5) / 0.5`` instead: the patch embedding is a linear,
unpadded convolution, so ``W (a x + b) + c = (W a) x + (W b + c)`` per input channel makes the two exactly the same
function. Evaluation, fine-tuning and serving then need to know nothing about the statistics a model was trained
with. Hybrid stems (padded ResNet convolutions) have no such exact rewrite and are refused.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["DEFAULT_MEAN", "DEFAULT_STD", "fold_input_normalisation", "is_default_normalisation"]

DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)
PATCH_KEY = "patch_embed.proj"


def is_default_normalisation(mean: Sequence[float], std: Sequence[float]) -> bool:
    """True when ``mean``/``std`` are the ``(u - 0.5) / 0.5`` every consumer assumes."""
    return tuple(float(m) for m in mean) == DEFAULT_MEAN and tuple(float(s) for s in std) == DEFAULT_STD


def fold_input_normalisation(state_dict: dict[str, torch.Tensor], mean: Sequence[float], std: Sequence[float],
                             to_mean: Sequence[float] = DEFAULT_MEAN, to_std: Sequence[float] = DEFAULT_STD,
                             prefix: str = "") -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` whose model takes ``(u - to_mean) / to_std`` inputs and computes exactly what the
    original computed on ``(u - mean) / std``. Only the patch kernel and bias change (``prefix``: where the ViT's
    keys start, e.g. ``"vit."`` inside a wrapper). ValueError for a state_dict without a plain patch embedding."""
    wkey, bkey = f"{prefix}{PATCH_KEY}.weight", f"{prefix}{PATCH_KEY}.bias"
    if wkey not in state_dict:
        raise ValueError(f"no '{wkey}' in the state_dict: input normalisation folds only into a plain patch "
                         "embedding (not a hybrid ResNet stem, whose padded convolutions have no exact rewrite)")
    w = state_dict[wkey]
    if w.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalisation has {len(mean)} means / {len(std)} stds for a {w.shape[1]}-channel patch "
                         "kernel")
    dt = torch.float64  # fold in double, store in the kernel's dtype
    m, s = torch.tensor(mean, dtype=dt), torch.tensor(std, dtype=dt)
    tm, ts = torch.tensor(to_mean, dtype=dt), torch.tensor(to_std, dtype=dt)
    if (s <= 0).any() or (ts <= 0).any():
        raise ValueError(f"normalisation stds must be positive, got {list(std)} -> {list(to_std)}")
    scale, shift = ts / s, (tm - m) / s  # the original input in terms of the new one: x = scale * x' + shift
    w64 = w.to(dt)
    out = dict(state_dict)
    out[wkey] = (w64 * scale.view(1, -1, 1, 1)).to(w.dtype)
    if bkey not in state_dict:
        raise ValueError(f"no '{bkey}' in the state_dict: the fold moves the mean into the patch bias")
    bias = state_dict[bkey].to(dt)
    out[bkey] = (bias + (w64 * shift.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))).to(w.dtype)
    return out
