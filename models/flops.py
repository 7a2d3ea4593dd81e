"""Analytic parameter counts and per-image compute (MACs / FLOPs) of a ``ViTConfig``.

Only matmuls and convolutions are counted (norms, softmax, GELU and adds are < 1 % for every variant);
FLOPs = 2 × MACs; training ≈ 3 × forward (backward computes gradients for inputs and weights).
"""

from __future__ import annotations

import math
from typing import Any

from .config import CANONICAL_NAMES, HybridConfig, ViTConfig


def _backbone_cost(h: HybridConfig, in_chans: int, hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
    """(params, MACs, output (h, w)) of the ResNet stem with 'SAME' padding (out = ceil(in / stride))."""
    def down(s: tuple[int, int], stride: int) -> tuple[int, int]:
        return (math.ceil(s[0] / stride), math.ceil(s[1] / stride))

    w = h.width
    s = down(hw, 2)
    params, macs = 49 * in_chans * w + 2 * w, 49 * in_chans * w * s[0] * s[1]
    s = down(s, 2)  # max-pool
    cin = w
    for i, n in enumerate(h.layers):
        f = w * 2**i
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            out = down(s, stride)
            a_in, a_out = s[0] * s[1], out[0] * out[1]
            params += cin * f + 9 * f * f + f * 4 * f + 2 * (f + f + 4 * f)
            macs += cin * f * a_in + 9 * f * f * a_out + 4 * f * f * a_out
            if cin != 4 * f or stride != 1:
                params += cin * 4 * f + 2 * 4 * f
                macs += cin * 4 * f * a_out
            cin, s = 4 * f, out
    return params, macs, s


def flops(cfg: ViTConfig, img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """Per-image cost of ``cfg`` (at ``img_size`` if given): params, fwd_macs, fwd_flops, train_flops, seq_len."""
    if img_size is not None:
        cfg = cfg.replace(img_size=img_size)
    D, M, L, P, C = cfg.width, cfg.mlp_dim, cfg.depth, cfg.patch_size, cfg.in_chans
    N, T = cfg.num_patches, cfg.seq_len

    if cfg.hybrid is not None:
        bb_params, bb_macs, _ = _backbone_cost(cfg.hybrid, C, cfg.img_hw)
        k = P // cfg.hybrid.stride
        embed_params = bb_params + cfg.hybrid.out_channels * k * k * D + D
        embed_macs = bb_macs + N * D * cfg.hybrid.out_channels * k * k
    else:
        embed_params = C * P * P * D + D
        embed_macs = N * D * C * P * P

    block_params = 3 * D * D + (3 * D if cfg.qkv_bias else 0) + D * D + D + 2 * D * M + M + D + 4 * D
    attn_macs = 2 * T * T * D  # q·kᵀ and attn·v
    block_macs = T * 3 * D * D + attn_macs + T * D * D + 2 * T * D * M

    head_params = head_macs = 0
    if cfg.representation_size:
        head_params += D * cfg.representation_size + cfg.representation_size
        head_macs += D * cfg.representation_size
    if cfg.num_classes:
        head_params += cfg.num_features * cfg.num_classes + cfg.num_classes
        head_macs += cfg.num_features * cfg.num_classes

    params = embed_params + cfg.num_prefix_tokens * D + T * D + L * block_params + 2 * D + head_params
    macs = embed_macs + L * block_macs + head_macs
    return {
        "params": params,
        "fwd_macs": macs,
        "fwd_flops": 2 * macs,
        "train_flops": 6 * macs,
        "attn_macs": L * attn_macs,
        "seq_len": T,
    }


def variant_table(img_size: int = 224, num_classes: int = 1000) -> list[dict[str, Any]]:
    """Rows ``{name, width, depth, heads, mlp_dim, seq_len, params, gmacs, gflops}`` for the canonical variants
    whose patch size divides ``img_size`` (the others have no model at that resolution)."""
    rows = []
    for name in CANONICAL_NAMES:
        if img_size % ViTConfig.from_name(name).patch_size:
            continue
        cfg = ViTConfig.from_name(name, img_size=img_size, num_classes=num_classes)
        f = flops(cfg)
        rows.append(
            {
                "name": name,
                "width": cfg.width,
                "depth": cfg.depth,
                "heads": cfg.num_heads,
                "mlp_dim": cfg.mlp_dim,
                "seq_len": f["seq_len"],
                "params": f["params"],
                "gmacs": f["fwd_macs"] / 1e9,
                "gflops": f["fwd_flops"] / 1e9,
            }
        )
    return rows
