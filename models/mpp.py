"""Masked patch prediction (paper §4.6, Appendix B.1.2): a self-supervised pretraining objective for a ViT.

50% of the patch embeddings are corrupted (of those, 80% replaced by a learned [mask] embedding, 10% by another
random patch embedding, 10% kept); the encoder then predicts each corrupted patch's 3-bit mean colour (512 classes)
from its output token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .vit import VisionTransformer


def mean_colour_targets(images: torch.Tensor, patch: int, bits: int = 3, mean: float = 0.5,
                        std: float = 0.5) -> torch.Tensor:
    """(B, 3, H, W) normalised images -> (B, N) class ids of each patch's mean colour, ``bits`` per channel."""
    x = images.float() * std + mean  # back to [0, 1]
    m = F.avg_pool2d(x, patch)  # (B, 3, H/P, W/P)
    levels = 2 ** bits
    q = (m.clamp(0, 1) * levels).long().clamp(max=levels - 1)
    ids = (q[:, 0] * levels + q[:, 1]) * levels + q[:, 2]
    return ids.flatten(1)


def corruption_plan(batch: int, num_patches: int, *, mask_ratio: float = 0.5, mask_prob: float = 0.8,
                    random_prob: float = 0.1, generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which patches are corrupted and how: returns (corrupted, use_mask_token, use_random_patch) bool (B, N)."""
    n_corrupt = int(round(mask_ratio * num_patches))
    scores = torch.rand(batch, num_patches, generator=generator, device=device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    corrupted = ranks < n_corrupt  # exactly n_corrupt per image
    kind = torch.rand(batch, num_patches, generator=generator, device=device)
    use_mask = corrupted & (kind < mask_prob)
    use_random = corrupted & (kind >= mask_prob) & (kind < mask_prob + random_prob)
    return corrupted, use_mask, use_random


class MaskedPatchPrediction(nn.Module):
    """Wraps a :class:`VisionTransformer`; ``forward(images, generator)`` returns the MPP loss and accuracy."""

    def __init__(self, vit: VisionTransformer, *, bits: int = 3, mask_ratio: float = 0.5, mask_prob: float = 0.8,
                 random_prob: float = 0.1) -> None:
        super().__init__()
        if vit.cfg.hybrid is not None:
            raise ValueError("masked patch prediction needs a plain patch embedding, not a hybrid stem")
        self.vit = vit
        self.bits, self.mask_ratio, self.mask_prob, self.random_prob = bits, mask_ratio, mask_prob, random_prob
        d = vit.cfg.width
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        nn.init.normal_(self.mask_token, std=0.02)
        self.mpp_head = nn.Linear(d, 2 ** (3 * bits))
        nn.init.zeros_(self.mpp_head.weight)
        nn.init.zeros_(self.mpp_head.bias)

    def no_weight_decay(self) -> set[str]:
        """The encoder's names (under ``vit.``) and the mask token."""
        return {"mask_token", *(f"vit.{n}" for n in self.vit.no_weight_decay())}

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Corrupt the patch embeddings and run the encoder: (tokens (B, prefix+N, D), corrupted (B, N))."""
        v = self.vit
        p = v.patch_embed(images)  # (B, N, D), before position embeddings (the paper corrupts patch embeddings)
        b, n, d = p.shape
        corrupted, use_mask, use_random = corruption_plan(
            b, n, mask_ratio=self.mask_ratio, mask_prob=self.mask_prob, random_prob=self.random_prob,
            generator=generator, device=p.device)
        # a random other patch embedding from the same batch
        src = torch.randint(0, b * n, (b, n), generator=generator, device=p.device)
        random_patches = p.reshape(b * n, d)[src.flatten()].reshape(b, n, d)
        p = torch.where(use_mask[..., None], self.mask_token.to(p.dtype).expand(b, n, d), p)
        p = torch.where(use_random[..., None], random_patches, p)
        if v.cls_token is not None:
            p = torch.cat([v.cls_token.expand(b, -1, -1), p], dim=1)
        x = v.pos_drop(p + v.pos_embed)
        for blk in v.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if v.grad_checkpointing and torch.is_grad_enabled() else blk(x)
        return v.norm(x), corrupted

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss over corrupted patches, accuracy of their colour prediction)."""
        tokens, corrupted = self.encode(images, generator)
        logits = self.mpp_head(tokens[:, self.vit.num_prefix_tokens:]).float()
        target = mean_colour_targets(images, self.vit.cfg.patch_size, self.bits)
        # masked means, not boolean indexing: indexing by a mask sizes its output on the host (a device sync per step)
        mask = corrupted.float()
        ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view_as(mask)
        count = mask.sum().clamp_min(1.0)
        loss = (ce * mask).sum() / count
        acc = ((logits.argmax(-1) == target).float() * mask).sum() / count
        return loss, acc.detach()
