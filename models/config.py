"""ViT configuration: the size table, ``"B/16"``-style name decoding and the typed ``ViTConfig``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

# Encoder sizes. Ti/S/B/L/H follow the paper (Table 1) and timm's small-scale names; g/G are the
# big_vision scaling-law sizes; "mu" is a debug flavour for smoke tests (torchtitan's "debugmodel").
VARIANTS: dict[str, dict[str, int]] = {
    "mu": dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

# ResNet backbones for hybrids (paper §3.1 "Hybrid Architecture"): the ViT "R50" is ResNet-50 with
# its 4th stage removed and 9 units in the 3rd (total stride 16); R26 keeps four stages of 2 units.
HYBRID_BACKBONES: dict[str, tuple[int, ...]] = {
    "R26": (2, 2, 2, 2),
    "R50": (3, 4, 9),
}

_NAME_RE = re.compile(r"^(?:(?P<backbone>R\d+)\+)?(?:ViT-)?(?P<size>[A-Za-z]+)(?:/(?P<patch>\d+))?$")


def _pair(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    return (int(v[0]), int(v[1]))


@dataclass(kw_only=True, frozen=True)
class HybridConfig:
    """ResNet-v2-style stem (GroupNorm + weight-standardised convs) that replaces patch slicing."""

    layers: tuple[int, ...] = (3, 4, 9)
    """Residual units per stage; stage i > 0 downsamples by 2 (stem conv + max-pool already give 4)."""
    width: int = 64
    """Root width; stage i has bottleneck width ``width * 2**i`` and ``4x`` that many output channels."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"hybrid.layers must be a non-empty tuple of positive ints, got {self.layers}")
        if self.width < 1:
            raise ValueError(f"hybrid.width must be positive, got {self.width}")

    @property
    def stride(self) -> int:
        """Total downsampling of the backbone: 4 from the stem, 2 per stage after the first."""
        return 4 * 2 ** (len(self.layers) - 1)

    @property
    def out_channels(self) -> int:
        """Channels of the feature map handed to the patch embedding."""
        return self.width * 2 ** (len(self.layers) - 1) * 4


@dataclass(kw_only=True, frozen=True)
class ViTConfig:
    """Everything needed to build a ``VisionTransformer``; JSON round-trips via ``to_dict``/``from_dict``."""

    width: int
    """Hidden size D of every token."""
    depth: int
    """Number of encoder blocks."""
    num_heads: int
    """Attention heads per block; must divide ``width``."""
    mlp_dim: int
    """Hidden size M of each block's MLP."""
    patch_size: int
    """Side P of a square patch in input pixels (for hybrids: the total stride, backbone included)."""
    img_size: int | tuple[int, int] = 224
    """Input resolution, square int or (height, width); must be a multiple of ``patch_size``."""
    num_classes: int = 1000
    """Classifier outputs; 0 makes the head an identity (the model then returns pre-logits)."""
    in_chans: int = 3
    """Input image channels."""
    pool: Literal["token", "gap"] = "token"
    """Pooling before the head: the class token, or the mean of the patch tokens (global average pooling)."""
    class_token: bool | None = None
    """Prepend a learned class token; None means "iff pool == 'token'" (the original code's choice)."""
    representation_size: int | None = None
    """Width of the pre-logits Dense+tanh layer used in pretraining (paper §3.1); None omits it."""
    dropout: float = 0.0
    """Dropout after the position embedding, inside the MLP and after attention (paper: 0.1 on ImageNet-21k)."""
    attn_dropout: float = 0.0
    """Dropout on attention weights."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the last block; block i uses ``drop_path * i / (depth - 1)``."""
    gelu: Literal["tanh", "exact"] = "tanh"
    """GELU form. Default "tanh": the approximation the original JAX code (flax ``nn.gelu``) trained with,
    so converted .npz checkpoints reproduce; HF transformers checkpoints expect "exact" (``from_hf`` sets it)."""
    layernorm_eps: float = 1e-6
    """LayerNorm epsilon (1e-6 in the original code; HF ViT uses 1e-12)."""
    classifier_bias_init: float = 0.0
    """Initial head bias; the paper's sigmoid cross-entropy pretraining on JFT uses -10."""
    qkv_bias: bool = True
    """Biases on the query/key/value projections."""
    init: Literal["jax", "torch"] = "jax"
    """Weight init. "jax": the original code's (lecun-normal patch kernel, xavier-uniform Dense kernels, near-zero
    MLP biases, zero head kernel), what the paper's checkpoints were trained from. "torch": PyTorch's own module
    defaults (kaiming-uniform kernels, uniform biases, a non-zero head; class token zero, position embedding
    N(0, 0.02)), what a bare PyTorch loop starts from."""
    hybrid: HybridConfig | None = None
    """ResNet stem for hybrid models (e.g. R50+ViT-B/16); None for plain patch slicing."""

    def __post_init__(self) -> None:
        # Normalise containers so that from_dict(to_dict(cfg)) == cfg (JSON turns tuples into lists).
        if not isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", _pair(self.img_size))
        if isinstance(self.hybrid, dict):
            object.__setattr__(self, "hybrid", HybridConfig(**self.hybrid))
        if self.class_token is None:
            object.__setattr__(self, "class_token", self.pool == "token")
        for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "in_chans"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {v!r}")
        if self.width % self.num_heads:
            raise ValueError(f"ViTConfig.num_heads={self.num_heads} does not divide width={self.width}")
        if self.num_classes < 0:
            raise ValueError(f"ViTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.pool not in ("token", "gap"):
            raise ValueError(f"ViTConfig.pool must be 'token' or 'gap', got {self.pool!r}")
        if self.pool == "token" and not self.class_token:
            raise ValueError("ViTConfig.pool='token' needs class_token=True")
        if self.init not in ("jax", "torch"):
            raise ValueError(f"ViTConfig.init must be 'jax' or 'torch', got {self.init!r}")
        if self.gelu not in ("tanh", "exact"):
            raise ValueError(f"ViTConfig.gelu must be 'tanh' or 'exact', got {self.gelu!r}")
        if self.representation_size is not None and self.representation_size < 1:
            raise ValueError(f"ViTConfig.representation_size must be None or positive, got {self.representation_size}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ViTConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.layernorm_eps <= 0:
            raise ValueError(f"ViTConfig.layernorm_eps must be positive, got {self.layernorm_eps}")
        h, w = _pair(self.img_size)
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViTConfig.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.hybrid is not None and self.patch_size % self.hybrid.stride:
            raise ValueError(
                f"ViTConfig.patch_size={self.patch_size} is not a multiple of the hybrid backbone stride "
                f"{self.hybrid.stride}"
            )

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def img_hw(self) -> tuple[int, int]:
        """Input (height, width)."""
        return _pair(self.img_size)

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        h, w = self.img_hw
        return (h // self.patch_size, w // self.patch_size)

    @property
    def num_patches(self) -> int:
        gh, gw = self.grid_size
        return gh * gw

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patch tokens (the class token, when present)."""
        return int(bool(self.class_token))

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def num_features(self) -> int:
        """Width of ``pre_logits`` output: the representation size when present, else the token width."""
        return self.representation_size or self.width

    # ---- (de)serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (tuples become lists, the hybrid config a nested dict)."""
        d = dataclasses.asdict(self)
        if isinstance(self.img_size, tuple):
            d["img_size"] = list(self.img_size)
        if self.hybrid is not None:
            d["hybrid"] = {"layers": list(self.hybrid.layers), "width": self.hybrid.width}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        """Inverse of ``to_dict``; unknown keys fail with one line naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> ViTConfig:
        """Copy with some fields changed (validated again)."""
        _check_fields(changes)
        if "pool" in changes and "class_token" not in changes:
            changes["class_token"] = None  # re-derive from the new pool
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ViTConfig:
        """Decode ``"<size>/<patch>"`` ("B/16", "S/4", "R50+B/16", "mu/4"); kwargs override any field."""
        fields = {**decode_variant(name), **_check_fields(overrides)}
        if "patch_size" not in fields:
            raise ValueError(f"variant {name!r} names no patch size; write e.g. '{name}/16' or pass patch_size")
        return cls(**fields)


def _check_fields(overrides: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(ViTConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown ViTConfig field(s): {', '.join(unknown)}")
    return overrides


def decode_variant(name: str) -> dict[str, Any]:
    """``"R50+B/16"`` -> ``{width, depth, mlp_dim, num_heads, patch_size, hybrid}`` (big_vision ``decode_variant``)."""
    m = _NAME_RE.match(name.strip())
    if m is None or m["size"] not in VARIANTS:
        raise ValueError(f"unknown ViT variant {name!r}; expected '<size>/<patch>' with size in {sorted(VARIANTS)}")
    out: dict[str, Any] = dict(VARIANTS[m["size"]])
    if m["patch"] is not None:
        out["patch_size"] = int(m["patch"])
    if m["backbone"] is not None:
        if m["backbone"] not in HYBRID_BACKBONES:
            known = sorted(HYBRID_BACKBONES)
            raise ValueError(f"unknown hybrid backbone {m['backbone']!r} in {name!r}; known: {known}")
        out["hybrid"] = HybridConfig(layers=HYBRID_BACKBONES[m["backbone"]])
    return out


# Canonical variants listed by ``variant_table`` (paper Table 1 plus the small-scale and hybrid ones).
CANONICAL_NAMES: tuple[str, ...] = ("Ti/16", "S/16", "B/32", "B/16", "L/32", "L/16", "H/14", "R50+B/16")

__all__ = ["VARIANTS", "HYBRID_BACKBONES", "CANONICAL_NAMES", "HybridConfig", "ViTConfig", "decode_variant"]
