"""Optimiser parameter groups and pretraining losses (paper §4.1 / Appendix B.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weight matrices/kernels decayed; biases, norms (``ndim < 2``) and the parameters the model names
    in ``no_weight_decay()`` (learned embeddings and tokens) not. The original code decays only dense/conv kernels
    (big_vision's ``.*/kernel``); nanoGPT's rule (every >= 2-D tensor) would also decay the position embedding
    and class token, which are 3-D."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name in skip:
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
        # scatter, not F.one_hot: one_hot checks the label range with two host reads (device syncs)
        target = labels.float() if labels.ndim == 2 else torch.zeros_like(logits).scatter_(1, labels[:, None], 1.0)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1).mean()
    raise ValueError(f"unknown loss '{kind}' (expected softmax or sigmoid)")


def top1_tensor(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy as a 0-d tensor on the logits' device (no host read). For (B, C) targets (multi-hot, smoothed
    or mixed) a hit is a predicted class holding the row's largest target (one of the positives; the larger part of
    a mix)."""
    pred = logits.argmax(-1)
    if labels.ndim == 2:
        return labels.gather(1, pred[:, None]).squeeze(1).ge(labels.amax(-1)).float().mean()
    return pred.eq(labels).float().mean()


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """:func:`top1_tensor` read back as a float."""
    return top1_tensor(logits, labels).item()
