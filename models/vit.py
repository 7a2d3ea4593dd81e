"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) and ``create``.

state_dict layout (timm-like, what the converters map into)::

    patch_embed.proj.{weight,bias}                 # (D, C, P, P); hybrids add patch_embed.backbone.*
    cls_token (1, 1, D)                            # only when cfg.class_token
    pos_embed (1, prefix + gh*gw, D)
    blocks.{i}.norm1 / attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2
    norm                                           # final LayerNorm, before pooling
    pre_logits_fc.{weight,bias}                    # only when cfg.representation_size (Dense + tanh)
    head.{weight,bias}                             # absent when num_classes == 0
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .layers import Block, PatchEmbed, dropout_or_identity, lecun_normal_
from .resnet import HybridEmbed


class VisionTransformer(nn.Module):
    """ViT / hybrid ViT built from a ``ViTConfig``; ``model.cfg`` always describes the current module."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grid_size = cfg.grid_size
        self.grad_checkpointing = False
        if cfg.hybrid is not None:
            self.patch_embed: nn.Module = HybridEmbed(cfg.hybrid, cfg.patch_size, cfg.in_chans, cfg.width)
        else:
            self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.width)
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.width)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.seq_len, cfg.width))
        self.pos_drop = dropout_or_identity(cfg.dropout)
        dpr = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            Block(
                width=cfg.width,
                num_heads=cfg.num_heads,
                mlp_dim=cfg.mlp_dim,
                qkv_bias=cfg.qkv_bias,
                gelu=cfg.gelu,
                eps=cfg.layernorm_eps,
                dropout=cfg.dropout,
                attn_dropout=cfg.attn_dropout,
                drop_path=dpr[i],
            )
            for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layernorm_eps)
        self.pre_logits_fc = nn.Linear(cfg.width, cfg.representation_size) if cfg.representation_size else None
        self.head: nn.Module = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.init_weights()

    # ---- init -----------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """``cfg.init == "jax"``, the original code's init: lecun-normal patch kernel, xavier-uniform Dense kernels,
        MLP biases N(0, 1e-6), pos-emb N(0, 0.02), class token and head kernel zero, head bias
        ``classifier_bias_init``. ``"torch"``: every layer's own ``reset_parameters`` (PyTorch's defaults), class
        token zero, pos-emb N(0, 0.02), head bias ``classifier_bias_init``."""
        if self.cfg.init == "torch":
            for m in self.modules():
                if m is not self and callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
            if self.cls_token is not None:
                nn.init.zeros_(self.cls_token)
            nn.init.normal_(self.pos_embed, std=0.02)
            if isinstance(self.head, nn.Linear) and self.cfg.classifier_bias_init:
                nn.init.constant_(self.head.bias, self.cfg.classifier_bias_init)
            return
        self.patch_embed.init_weights()
        if self.cls_token is not None:
            nn.init.zeros_(self.cls_token)
        nn.init.normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            blk.init_weights()
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        if self.pre_logits_fc is not None:
            lecun_normal_(self.pre_logits_fc.weight)
            nn.init.zeros_(self.pre_logits_fc.bias)
        if isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.constant_(self.head.bias, self.cfg.classifier_bias_init)

    # ---- forward --------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != self.cfg.img_hw:
            raise ValueError(
                f"input is {tuple(x.shape[-2:])} but the model was built for img_size={self.cfg.img_hw}; "
                "use load_pretrained into a model of the new size"
            )
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_features(
        self, x: torch.Tensor, return_attn: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Images (B, C, H, W) → tokens (B, prefix + N, D) after the final LayerNorm.

        ``return_attn=True`` also returns each block's attention weights (B, heads, T, T); that path
        materialises the weights instead of using SDPA, so use it for analysis only.
        """
        x = self._embed(x)
        if return_attn:
            attns = []
            for blk in self.blocks:
                x, a = blk.forward_with_attn(x)
                attns.append(a)
            return self.norm(x), attns
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool (class token or mean of patch tokens) → [Dense + tanh pre-logits] → head."""
        if self.cfg.pool == "token":
            x = tokens[:, 0]
        else:
            x = tokens[:, self.num_prefix_tokens :].mean(dim=1)
        if self.pre_logits_fc is not None:
            x = torch.tanh(self.pre_logits_fc(x))
        return x if pre_logits else self.head(x)

    def pre_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Images → (B, num_features) frozen features, as read by few-shot linear probes."""
        return self.forward_head(self.forward_features(x), pre_logits=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.no_grad()
    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-block attention weights (B, heads, T, T) for the analysis stage (paper §4.5)."""
        _, attns = self.forward_features(x, return_attn=True)
        return attns

    # ---- fine-tuning / training helpers ---------------------------------------------------------
    def reset_classifier(self, num_classes: int, drop_pre_logits: bool = True) -> None:
        """Fine-tune head (paper §3.2): optionally remove pre-logits, new head with kernel and bias zero."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        ref = self.pos_embed
        changes: dict[str, Any] = {"num_classes": num_classes}
        if drop_pre_logits and self.pre_logits_fc is not None:
            self.pre_logits_fc = None
            changes["representation_size"] = None
        self.cfg = dataclasses.replace(self.cfg, **changes)
        if num_classes:
            head = nn.Linear(self.cfg.num_features, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.head = head
        else:
            self.head = nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, non-reentrant)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay besides biases and norms."""
        return {"pos_embed", "cls_token"}


def create(name_or_cfg: str | ViTConfig, **overrides: Any) -> VisionTransformer:
    """``create("B/16", num_classes=10, img_size=384)`` or ``create(cfg)`` (overrides still apply)."""
    if isinstance(name_or_cfg, ViTConfig):
        cfg = name_or_cfg.replace(**overrides) if overrides else name_or_cfg
    elif isinstance(name_or_cfg, str):
        cfg = ViTConfig.from_name(name_or_cfg, **overrides)
    else:
        raise ValueError(f"create() takes a variant name or a ViTConfig, got {type(name_or_cfg).__name__}")
    return VisionTransformer(cfg)
