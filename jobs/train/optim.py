"""Optimiser parameter groups and pretraining losses (paper §4.1 / Appendix B.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Learned embeddings are not decayed (as in the original code and nanoGPT's configure_optimizers): they are
# 3-D tensors, so the ``ndim < 2`` rule alone would decay them.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "reg_token")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices/kernels decayed; biases, norms and embeddings not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """``softmax`` cross-entropy, or ``sigmoid`` cross-entropy summed over classes (the paper's JFT loss).

    ``labels`` are class indices (B,) or multi-hot targets (B, C); sigmoid accepts both.
    """
    logits = logits.float()
    if kind == "softmax":
        if labels.ndim == 2:
            return torch.sum(-labels * F.log_softmax(logits, -1), -1).div(labels.sum(-1).clamp_min(1)).mean()
        return F.cross_entropy(logits, labels)
    if kind == "sigmoid":
        target = labels.float() if labels.ndim == 2 else F.one_hot(labels, logits.shape[-1]).float()
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean()
    raise ValueError(f"unknown loss '{kind}' (expected softmax or sigmoid)")


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy (for multi-hot labels: the predicted class is one of the positives)."""
    pred = logits.argmax(-1)
    if labels.ndim == 2:
        return labels.gather(1, pred[:, None]).gt(0).float().mean().item()
    return pred.eq(labels).float().mean().item()
