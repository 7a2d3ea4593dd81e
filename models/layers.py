"""Encoder building blocks (pre-LN Transformer block, attention, MLP) and the original code's initialisers."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ---- initialisers (flax defaults used by the original vision_transformer / big_vision code) --------
def lecun_normal_(w: torch.Tensor) -> torch.Tensor:
    """flax ``lecun_normal``: truncated normal (±2σ) with variance 1/fan_in after truncation."""
    fan_in = w[0].numel()  # torch layout (out, in, *kernel): everything but dim 0 feeds one output
    # 0.8796... is the std of a unit normal truncated to [-2, 2]; dividing restores variance 1/fan_in.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def xavier_uniform_fused_(w: torch.Tensor, parts: int) -> torch.Tensor:
    """xavier_uniform on each of ``parts`` row-blocks of a fused (parts*out, in) weight.

    The original code has separate query/key/value Dense layers (D×D each); initialising the fused
    (3D, D) matrix as one would shrink the bound by sqrt(2).
    """
    for chunk in w.chunk(parts, dim=0):
        nn.init.xavier_uniform_(chunk)
    return w


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a sample's residual branch with probability ``p`` (rescaled by 1/(1-p))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep.div_(1.0 - p)


def dropout_or_identity(p: float) -> nn.Module:
    """Dropout, or Identity when p == 0 (skips a dispatch per call; matters for small models on CPU)."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


# ---- modules --------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Linear projection of flattened P×P patches, done as a conv with kernel = stride = P (paper §3.1)."""

    def __init__(self, patch_size: int, in_chans: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, H', W') -> (B, N, D)

    def init_weights(self) -> None:
        lecun_normal_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection; SDPA on the fast path."""

    def __init__(self, width: int, num_heads: int, qkv_bias: bool, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.attn_dropout = attn_dropout
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)
        self.proj_drop = dropout_or_identity(dropout)

    def forward(self, x: torch.Tensor, return_attn: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, D = x.shape
        # unbind along dim 2 (not a leading permute): backward then stacks the q/k/v gradients straight
        # into the (B, T, 3, heads, head_dim) layout of the fused output, one copy instead of two.
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # each (B, heads, T, head_dim), strided
        p = self.attn_dropout if self.training else 0.0
        attn = None
        if return_attn:
            # Slow path for analysis only: materialises the (B, heads, T, T) weights.
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            o = F.dropout(attn, p) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        o = o.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(o)), attn

    def init_weights(self) -> None:
        xavier_uniform_fused_(self.qkv.weight, 3)
        nn.init.xavier_uniform_(self.proj.weight)
        if self.qkv.bias is not None:
            nn.init.zeros_(self.qkv.bias)
        nn.init.zeros_(self.proj.bias)


class Mlp(nn.Module):
    """Dense(D→M) → GELU → Dropout → Dense(M→D) → Dropout (the original ``MlpBlock``)."""

    def __init__(self, width: int, mlp_dim: int, gelu: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.act = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop = dropout_or_identity(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))

    def init_weights(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.normal_(fc.bias, std=1e-6)


class Block(nn.Module):
    """Pre-LN encoder block: ``x + MSA(LN(x))`` then ``x + MLP(LN(x))`` (paper Eq. 2-3)."""

    def __init__(
        self,
        *,
        width: int,
        num_heads: int,
        mlp_dim: int,
        qkv_bias: bool,
        gelu: str,
        eps: float,
        dropout: float,
        attn_dropout: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, num_heads, qkv_bias, attn_dropout, dropout)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, gelu, dropout)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.attn(self.norm1(x))
        x = x + drop_path(y, self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)

    def forward_with_attn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Same as ``forward`` but also returns the (B, heads, T, T) attention weights (slow path)."""
        y, attn = self.attn(self.norm1(x), return_attn=True)
        x = x + drop_path(y, self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        assert attn is not None
        return x, attn

    def init_weights(self) -> None:
        for norm in (self.norm1, self.norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        self.attn.init_weights()
        self.mlp.init_weights()
