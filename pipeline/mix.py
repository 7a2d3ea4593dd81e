"""Batch-level Mixup / CutMix and label smoothing as pure torch functions (any device), for the trainer.

They act on a batch after the stream delivered it, so the stream's exactly-once sample accounting and its resume
state are untouched: mixing neither drops nor adds samples. Randomness is a pure function of (seed, step, rank):
a resumed run mixes step s exactly as before, and every rank draws its own coefficients.

Targets are (B, C) float32 and cover both losses:
- softmax cross-entropy with int labels: one-hot rows, smoothed and mixed, each row sums to 1;
- sigmoid / multi-label with multi-hot (B, C) labels: the rows mixed as lam * y + (1 - lam) * y_partner.
Label smoothing is one rule for both, `y * (1 - eps) + eps / C` (timm's `BinaryCrossEntropy` uses the same on/off
values): for sigmoid it keeps a negative's target at eps / C instead of pulling all C negatives to eps / 2, which
with 21k classes would swamp the loss. Smoothing is affine, so smoothing then mixing equals mixing then smoothing.

Pairs are formed by flipping the batch (sample i with sample B-1-i), as timm does. Mixup draws
lam ~ Beta(alpha, alpha) and keeps max(lam, 1 - lam) (big_vision sorts its Dirichlet weights the same way, so each
image stays the larger part of its mix); CutMix draws lam ~ Beta(alpha, alpha), pastes the partner's box of side
sqrt(1 - lam) x (H, W) at a uniform centre, clipped to the image, and corrects lam to the pasted area (timm's
`rand_bbox` + `correct_lam`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(kw_only=True)
class MixConfig:
    """Mixup / CutMix / label smoothing of training batches (the trainer applies them with `mix`)."""

    mixup_alpha: float = 0.0
    """Mixup Beta(alpha, alpha) concentration; 0 turns Mixup off (AugReg: 0.2, 0.5, 0.8)."""
    cutmix_alpha: float = 0.0
    """CutMix Beta(alpha, alpha) concentration; 0 turns CutMix off (timm/DeiT: 1.0)."""
    switch_prob: float = 0.5
    """With both alphas > 0: probability that a batch gets CutMix rather than Mixup."""
    prob: float = 1.0
    """Probability that a batch is mixed at all (unmixed batches still get smoothed targets)."""
    label_smoothing: float = 0.0
    """eps of `y * (1 - eps) + eps / num_classes`, for softmax and sigmoid targets alike."""

    def __post_init__(self) -> None:
        for name in ("mixup_alpha", "cutmix_alpha"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MixConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("switch_prob", "prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MixConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"MixConfig.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mixing(self) -> bool:
        """Whether any batch can be mixed (an alpha > 0 and prob > 0)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0

    def mix(self, images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, seed: int, step: int,
            rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`mix_batch` with this config's fields."""
        return mix_batch(images, labels, num_classes=num_classes, mixup_alpha=self.mixup_alpha,
                         cutmix_alpha=self.cutmix_alpha, switch_prob=self.switch_prob, prob=self.prob,
                         label_smoothing=self.label_smoothing, seed=seed, step=step, rank=rank)


@dataclass(frozen=True)
class MixDraw:
    """What one batch gets: kind 'none' | 'mixup' | 'cutmix', the weight lam of each sample's own image (1 for
    'none'; for CutMix, 1 - pasted area / image area), and the pasted box (y0, y1, x0, x1) for CutMix."""

    kind: str
    lam: float
    box: tuple[int, int, int, int] | None = None


def mix_rng(seed: int, step: int, rank: int) -> np.random.Generator:
    """The generator of one batch's draws: a pure function of (seed, step, rank)."""
    h = hashlib.blake2b(f"mix/{seed}/{step}/{rank}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def draw_mix(height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float, switch_prob: float = 0.5,
             prob: float = 1.0, seed: int, step: int, rank: int = 0) -> MixDraw:
    """The mixing of one (H, W) batch, drawn in a fixed order: apply?, CutMix-or-Mixup?, lam, box centre."""
    rng = mix_rng(seed, step, rank)
    apply = rng.random() < prob
    use_cutmix = rng.random() < switch_prob
    if not apply or (mixup_alpha <= 0 and cutmix_alpha <= 0):
        return MixDraw(kind="none", lam=1.0)
    if mixup_alpha <= 0:
        use_cutmix = True
    elif cutmix_alpha <= 0:
        use_cutmix = False
    if not use_cutmix:
        lam = float(rng.beta(mixup_alpha, mixup_alpha))
        return MixDraw(kind="mixup", lam=max(lam, 1.0 - lam))
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha))
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y0, y1 = max(0, cy - cut_h // 2), min(height, cy - cut_h // 2 + cut_h)
    x0, x1 = max(0, cx - cut_w // 2), min(width, cx - cut_w // 2 + cut_w)
    area = max(0, y1 - y0) * max(0, x1 - x0)
    return MixDraw(kind="cutmix", lam=1.0 - area / (height * width), box=(y0, y1, x0, x1))


def smooth_targets(labels: torch.Tensor, num_classes: int, eps: float = 0.0) -> torch.Tensor:
    """(B, C) float32 targets `y * (1 - eps) + eps / C` from int labels (B,) (y one-hot) or multi-hot (B, C)."""
    if labels.dim() == 1:
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(f"smooth_targets: 1-d labels must be class indices (int), got {labels.dtype}")
        # scatter, not one_hot: one_hot reads the labels back to the host to check their range (a device sync)
        y = torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels.long()[:, None], 1.0)
    elif labels.dim() == 2 and labels.shape[1] == num_classes:
        y = labels.to(torch.float32)
    else:
        raise ValueError(f"smooth_targets: labels must be (B,) indices or (B, {num_classes}) multi-hot, "
                         f"got shape {tuple(labels.shape)}")
    return y * (1.0 - eps) + eps / num_classes if eps else y


def apply_mix(images: torch.Tensor, targets: torch.Tensor, draw: MixDraw) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix (B, C, H, W) images and (B, K) targets with their flipped batch as `draw` says (new tensors)."""
    if draw.kind == "none":
        return images, targets
    partner = images.flip(0)
    if draw.kind == "mixup":
        mixed = torch.lerp(partner, images, draw.lam)  # partner + lam * (image - partner): one pass
    else:
        y0, y1, x0, x1 = draw.box
        mixed = images.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return mixed, torch.lerp(targets.flip(0), targets, draw.lam)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, *, num_classes: int, mixup_alpha: float = 0.0,
              cutmix_alpha: float = 0.0, switch_prob: float = 0.5, prob: float = 1.0, label_smoothing: float = 0.0,
              seed: int, step: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, soft targets (B, C) float32) for a (B, C, H, W) batch and int (B,) or multi-hot (B, C) labels.

    Pure: the inputs are not modified; the same (seed, step, rank) always mixes the same way."""
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"mix_batch: images must be (B, C, H, W) with one label row each, got "
                         f"{tuple(images.shape)} and {tuple(labels.shape)}")
    targets = smooth_targets(labels, num_classes, label_smoothing).to(images.device)
    draw = draw_mix(images.shape[-2], images.shape[-1], mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                    switch_prob=switch_prob, prob=prob, seed=seed, step=step, rank=rank)
    return apply_mix(images, targets, draw)
