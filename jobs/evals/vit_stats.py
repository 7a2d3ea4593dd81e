"""The numbers behind the paper's analysis figures (§4.5, Figure 7), as pure tensor functions.

Kept apart from plotting so each can be checked against a brute-force reference: principal components of the
patch-embedding filters, cosine similarity of position embeddings, mean attention distance, attention rollout.
"""

from __future__ import annotations

import torch

__all__ = [
    "attention_rollout_maps",
    "filter_principal_components",
    "mean_attention_distance",
    "patch_distances",
    "posemb_cosine_similarity",
]


def filter_principal_components(weight: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``n`` principal components of the patch-embedding filters.

    ``weight`` is the (D, C, P, P) kernel of the patch projection: D filters, each a point in C·P·P pixel space.
    Returns ``(components (n, C, P, P), explained_variance_ratio (n,))``; components are unit vectors in pixel space
    (the directions the D filters vary along most), sign fixed so each has a positive sum.
    """
    if weight.ndim != 4:
        raise ValueError(f"patch-embedding weight must be (D, C, P, P), got shape {tuple(weight.shape)}")
    d, c, ph, pw = weight.shape
    flat = weight.detach().double().reshape(d, -1)
    n_max = min(d, flat.shape[1])
    if not 1 <= n <= n_max:
        raise ValueError(f"n must be in [1, {n_max}] for a {d}x{flat.shape[1]} filter bank, got {n}")
    centred = flat - flat.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    var = s**2
    ratio = var / var.sum().clamp_min(1e-300)
    comps = vh[:n]
    comps = comps * torch.where(comps.sum(dim=1, keepdim=True) < 0, -1.0, 1.0)
    return comps.reshape(n, c, ph, pw).float(), ratio[:n].float()


def posemb_cosine_similarity(pos_embed: torch.Tensor, num_prefix_tokens: int, grid: tuple[int, int]) -> torch.Tensor:
    """(gh, gw, gh, gw) cosine similarity between the position embedding of patch (r, c) and of every (r', c').

    Prefix-token (class token) embeddings are left out: the figure is about the 2-D patch grid.
    """
    gh, gw = grid
    pe = pos_embed.detach().float().reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:]
    if pe.shape[0] != gh * gw:
        raise ValueError(f"pos_embed has {pe.shape[0]} patch rows, grid {gh}x{gw} needs {gh * gw}")
    pe = torch.nn.functional.normalize(pe, dim=-1)
    return (pe @ pe.T).reshape(gh, gw, gh, gw)


def patch_distances(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    """(N, N) Euclidean distances in input pixels between the centres of the patches of a (gh, gw) grid."""
    gh, gw = grid
    rr, cc = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([rr.flatten(), cc.flatten()], dim=1).double() * patch_size
    return torch.cdist(pos, pos)


def mean_attention_distance(
    attns: list[torch.Tensor], grid: tuple[int, int], patch_size: int, num_prefix_tokens: int
) -> torch.Tensor:
    """(layers, heads) attention distance in pixels, averaged over images and query patches (paper Fig. 7 right).

    For each patch query, the attention weights onto patch keys are renormalised to sum to one (mass on the class
    token has no position) and averaged against the pixel distance between query and key patch centres.
    """
    dist = patch_distances(grid, patch_size)
    n = dist.shape[0]
    p = num_prefix_tokens
    out = []
    for i, a in enumerate(attns):
        if a.ndim != 4 or a.shape[-1] != p + n or a.shape[-2] != p + n:
            raise ValueError(f"attention map {i} has shape {tuple(a.shape)}, expected (B, heads, {p + n}, {p + n})")
        w = a.detach().double()[:, :, p:, p:]
        w = w / w.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        out.append((w * dist).sum(dim=-1).mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out).float()


def attention_rollout_maps(
    attns: list[torch.Tensor], grid: tuple[int, int], num_prefix_tokens: int, residual: float = 0.5
) -> torch.Tensor:
    """(B, gh, gw) attention rollout (Abnar & Zuidema 2020) from the class token to each patch.

    Per layer the heads are averaged and the residual path is added as ``residual * I + (1 - residual) * A``
    (rows renormalised); the layers' matrices are multiplied from the first block to the last. The class token's
    row over the patch tokens is returned; for a model without prefix tokens (GAP), the mean over patch rows.
    """
    if not attns:
        raise ValueError("attention rollout needs at least one attention map")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual}")
    b, _, t, _ = attns[0].shape
    eye = torch.eye(t, dtype=torch.float64)
    joint = eye.expand(b, t, t)
    for a in attns:
        m = residual * eye + (1.0 - residual) * a.detach().double().mean(dim=1)
        m = m / m.sum(dim=-1, keepdim=True)
        joint = m @ joint
    p = num_prefix_tokens
    rows = joint[:, 0, p:] if p > 0 else joint[:, :, :].mean(dim=1)
    gh, gw = grid
    if rows.shape[-1] != gh * gw:
        raise ValueError(f"attention covers {rows.shape[-1]} patches, grid {gh}x{gw} needs {gh * gw}")
    return rows.reshape(b, gh, gw).float()
