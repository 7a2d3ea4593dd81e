"""HF transformers ``ViTModel`` / ``ViTForImageClassification`` → vitpipe (re-exported by ``convert``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from .config import ViTConfig

# HF activation names → vitpipe's GELU choice.
_GELU = {"gelu": "exact", "gelu_python": "exact", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh", "gelu_fast": "tanh"}
# Per-layer HF module (transformers >= 5 names) → vitpipe module; q/k/v are fused separately.
_LAYER = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Checkpoints saved by transformers 4 (every ViT on the Hub) use these names; rename them to the v5 ones.
_V4_RENAMES = [
    (r"encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
    (r"encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
    (r"encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
]


def _v4_to_v5(key: str) -> str:
    for pat, rep in _V4_RENAMES:
        key = re.sub(pat, rep, key)
    return key


def _read_state_dict(src: dict[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(src, dict):
        return src
    path = Path(src)
    if not path.is_file():
        raise FileNotFoundError(f"HF checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # shipped with transformers

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_config(hf_config: Any) -> dict[str, Any]:
    if hf_config is None:
        return {}
    if isinstance(hf_config, (str, os.PathLike)):
        path = Path(hf_config)
        if not path.is_file():
            raise FileNotFoundError(f"HF config not found: {path}")
        return json.loads(path.read_text())
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):  # transformers.ViTConfig
        return hf_config.to_dict()
    raise ValueError(f"hf_config must be a transformers ViTConfig, a dict or a config.json path, got {type(hf_config)}")


def from_hf(
    state_dict: dict[str, torch.Tensor] | str | os.PathLike,
    hf_config: Any = None,
    **overrides: Any,
) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """Convert an HF ViT state_dict (or a .bin/.safetensors path) → (ViTConfig, vitpipe state_dict).

    ``ViTModel``'s pooler (Dense + tanh on the class token) becomes the pre-logits layer, so
    ``model.pre_logits(x)`` equals HF's ``pooler_output``; ``ViTForImageClassification``'s classifier
    becomes the head. Without ``hf_config`` the shapes give everything but the head count (assumed
    width / 64, as in every released HF ViT) and HF defaults apply (exact GELU, LayerNorm eps 1e-12).
    """
    raw = {_v4_to_v5(k): v for k, v in _read_state_dict(state_dict).items()}
    hc = _read_config(hf_config)
    # ViTForImageClassification nests the encoder under "vit."; ViTModel has it at the root.
    pre = "vit." if any(k.startswith("vit.") for k in raw) else ""
    if f"{pre}embeddings.patch_embeddings.projection.weight" not in raw:
        raise ValueError("state_dict has no embeddings.patch_embeddings.projection.weight: not an HF ViT checkpoint")
    sd: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(pre + key)
        return raw[pre + key].detach().to(torch.float32).clone()

    sd["patch_embed.proj.weight"] = take("embeddings.patch_embeddings.projection.weight")
    sd["patch_embed.proj.bias"] = take("embeddings.patch_embeddings.projection.bias")
    sd["cls_token"] = take("embeddings.cls_token")
    sd["pos_embed"] = take("embeddings.position_embeddings")
    depth = 1 + max(int(m[1]) for k in raw for m in [re.match(rf"{re.escape(pre)}layers\.(\d+)\.", k)] if m)
    for i in range(depth):
        h, v = f"layers.{i}.", f"blocks.{i}."
        qkv = [f"{h}attention.{n}_proj" for n in "qkv"]
        sd[v + "attn.qkv.weight"] = torch.cat([take(n + ".weight") for n in qkv])
        if pre + qkv[0] + ".bias" in raw:
            sd[v + "attn.qkv.bias"] = torch.cat([take(n + ".bias") for n in qkv])
        for hf_name, name in _LAYER.items():
            sd[f"{v}{name}.weight"] = take(f"{h}{hf_name}.weight")
            sd[f"{v}{name}.bias"] = take(f"{h}{hf_name}.bias")
    sd["norm.weight"], sd["norm.bias"] = take("layernorm.weight"), take("layernorm.bias")
    rep = None
    if pre + "pooler.dense.weight" in raw:
        if hc.get("pooler_act", "tanh") != "tanh":
            raise ValueError(f"HF pooler_act={hc['pooler_act']!r}; vitpipe's pre-logits layer is Dense + tanh")
        sd["pre_logits_fc.weight"], sd["pre_logits_fc.bias"] = take("pooler.dense.weight"), take("pooler.dense.bias")
        rep = sd["pre_logits_fc.weight"].shape[0]
    num_classes = 0
    if "classifier.weight" in raw:
        used.update({"classifier.weight", "classifier.bias"})
        sd["head.weight"] = raw["classifier.weight"].detach().float().clone()
        sd["head.bias"] = raw["classifier.bias"].detach().float().clone()
        num_classes = sd["head.weight"].shape[0]
    # mask_token (ViTForMaskedImageModeling) has no vitpipe counterpart; anything else is a layout we do not know.
    leftover = sorted(k for k in raw if k not in used and not k.endswith("embeddings.mask_token"))
    if leftover:
        raise ValueError(f"unconverted HF keys (unknown ViT layout): {', '.join(leftover[:5])}")

    width, cin, patch, _ = sd["patch_embed.proj.weight"].shape
    act = hc.get("hidden_act", "gelu")
    if act not in _GELU:
        raise ValueError(f"HF hidden_act={act!r} is not a GELU vitpipe supports ({sorted(_GELU)})")
    n = sd["pos_embed"].shape[1] - 1
    side = round(n**0.5)
    if "image_size" not in hc and "img_size" not in overrides and side * side != n:
        raise ValueError(f"{n} patch position embeddings are not a square grid; pass hf_config or img_size=(h, w)")
    img = hc.get("image_size", side * patch)
    fields: dict[str, Any] = dict(
        width=width, depth=depth, num_heads=hc.get("num_attention_heads", max(width // 64, 1)),
        mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], patch_size=patch, img_size=img,
        num_classes=num_classes, in_chans=cin, pool="token", representation_size=rep,
        dropout=hc.get("hidden_dropout_prob", 0.0), attn_dropout=hc.get("attention_probs_dropout_prob", 0.0),
        gelu=_GELU[act], layernorm_eps=hc.get("layer_norm_eps", 1e-12), qkv_bias="blocks.0.attn.qkv.bias" in sd,
    )  # fmt: skip
    fields.update(overrides)
    return ViTConfig(**fields), sd
