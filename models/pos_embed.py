"""Position-embedding resizing and loading a checkpoint into a model of another resolution/head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig


def resize_pos_embed(
    posemb: torch.Tensor,
    new_grid: tuple[int, int] | int,
    old_grid: tuple[int, int] | int | None = None,
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize (1, prefix + gh*gw, D) learned position embeddings to ``new_grid`` (paper §3.2).

    Prefix-token rows (class token, registers) are kept as they are; the 2-D patch grid is resampled
    bilinearly with aligned corners, which is what the original code's ``scipy.ndimage.zoom(order=1)``
    does. ``old_grid`` None means square (and fails if the patch count is not a square).
    Interpolation runs in fp32 whatever the input dtype.
    """
    if posemb.ndim != 3 or posemb.shape[0] != 1:
        raise ValueError(f"posemb must be (1, tokens, dim), got {tuple(posemb.shape)}")
    if num_prefix_tokens < 0 or num_prefix_tokens > posemb.shape[1]:
        raise ValueError(f"num_prefix_tokens={num_prefix_tokens} does not fit {posemb.shape[1]} position embeddings")
    new_hw = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    n = grid.shape[1]
    if old_grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ValueError(f"{n} patch position embeddings are not a square grid; pass old_grid=(rows, cols)")
        old_hw = (side, side)
    else:
        old_hw = (old_grid, old_grid) if isinstance(old_grid, int) else tuple(old_grid)
    if old_hw[0] * old_hw[1] != n:
        raise ValueError(f"old_grid={old_hw} has {old_hw[0] * old_hw[1]} cells but posemb has {n} patch rows")
    if min(new_hw) < 1:
        raise ValueError(f"new_grid must be positive, got {new_hw}")
    if tuple(old_hw) == tuple(new_hw):
        return posemb
    dim = posemb.shape[-1]
    g = grid.reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2).float()
    g = F.interpolate(g, size=new_hw, mode="bilinear", align_corners=True)
    g = g.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(posemb.dtype)
    return torch.cat([prefix, g], dim=1)


def _as_cfg(cfg: ViTConfig | dict[str, Any]) -> ViTConfig:
    if isinstance(cfg, ViTConfig):
        return cfg
    if isinstance(cfg, dict):
        return ViTConfig.from_dict(cfg)
    raise ValueError(f"src_cfg must be a ViTConfig or its to_dict(), got {type(cfg).__name__}")


def adapt_state_dict(
    state_dict: dict[str, torch.Tensor],
    src_cfg: ViTConfig | dict[str, Any],
    dst_cfg: ViTConfig,
    drop_head: bool = True,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rewrite a vitpipe state_dict made for ``src_cfg`` so that it fits ``dst_cfg``.

    Returns (new state_dict, names of dropped keys). Position embeddings: prefix rows shared by both are
    kept, patch grid resized; the head is dropped when ``drop_head`` or shapes differ; the pre-logits
    layer is dropped when ``dst_cfg`` has none or its size differs.
    """
    src = _as_cfg(src_cfg)
    for f in ("width", "patch_size", "in_chans", "depth", "mlp_dim"):
        if getattr(src, f) != getattr(dst_cfg, f):
            raise ValueError(f"checkpoint {f}={getattr(src, f)} does not match the model's {f}={getattr(dst_cfg, f)}")
    if (src.hybrid is None) != (dst_cfg.hybrid is None) or (src.hybrid and src.hybrid != dst_cfg.hybrid):
        raise ValueError(f"checkpoint hybrid={src.hybrid} does not match the model's hybrid={dst_cfg.hybrid}")
    sd = dict(state_dict)
    dropped: list[str] = []

    def drop(prefix: str) -> None:
        for k in [k for k in sd if k.startswith(prefix)]:
            dropped.append(k)
            del sd[k]

    if "pos_embed" in sd:
        pe = sd["pos_embed"]
        if pe.shape[1] != src.seq_len:
            raise ValueError(f"checkpoint pos_embed has {pe.shape[1]} rows but its config implies {src.seq_len}")
        pe = resize_pos_embed(pe, dst_cfg.grid_size, src.grid_size, src.num_prefix_tokens)
        sp, dp = src.num_prefix_tokens, dst_cfg.num_prefix_tokens
        if sp != dp:
            # Prefix counts differ (e.g. token -> gap): only the patch rows carry over; load_pretrained
            # writes them under the model's own prefix rows, which keep their current values.
            pe = pe[:, sp:]
            sd["pos_embed.__patch_rows__"] = pe
            del sd["pos_embed"]
        else:
            sd["pos_embed"] = pe
    if "cls_token" in sd and not dst_cfg.class_token:
        drop("cls_token")
    if dst_cfg.representation_size is None or (
        "pre_logits_fc.weight" in sd and sd["pre_logits_fc.weight"].shape[0] != dst_cfg.representation_size
    ):
        drop("pre_logits_fc.")
    head_w = sd.get("head.weight")
    if drop_head or dst_cfg.num_classes == 0 or (
        head_w is not None and tuple(head_w.shape) != (dst_cfg.num_classes, dst_cfg.num_features)
    ):
        drop("head.")
    return sd, dropped


@torch.no_grad()
def load_pretrained(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    src_cfg: ViTConfig | dict[str, Any],
    drop_head: bool = True,
) -> dict[str, list[str]]:
    """Load a vitpipe state_dict exported for ``src_cfg`` into ``model`` (any resolution / patch grid).

    The source grid and prefix count come from ``src_cfg`` (the checkpoint's ``model.json``), never
    from guessing. Returns ``{"missing": [...], "unexpected": [...], "dropped": [...]}``; keys the model
    lacks stay at their initial values (a dropped head stays zero-initialised, ready to fine-tune).
    """
    dst_cfg: ViTConfig = model.cfg  # type: ignore[assignment]
    sd, dropped = adapt_state_dict(state_dict, src_cfg, dst_cfg, drop_head=drop_head)
    patch_rows = sd.pop("pos_embed.__patch_rows__", None)
    if patch_rows is not None:
        pe = model.pos_embed.detach().clone()
        pe[:, dst_cfg.num_prefix_tokens :] = patch_rows.to(pe)
        sd["pos_embed"] = pe
    result = model.load_state_dict(sd, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys), "dropped": dropped}
