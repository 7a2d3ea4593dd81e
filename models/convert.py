"""Checkpoint converters into vitpipe's state_dict layout: original/big_vision ``.npz`` and HF transformers ViT.

Each importer returns ``(ViTConfig, state_dict)``; the config is read from the checkpoint (shapes, HF
config), so ``create(cfg).load_state_dict(sd)`` is exact and ``load_pretrained`` can move it to another
resolution without guessing.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from .config import HybridConfig, ViTConfig
from .hf import from_hf

__all__ = ["from_hf", "from_npz", "to_npz"]

PathOrFile = str | os.PathLike | IO[bytes]
_T = "Transformer/"


# ---- original .npz (google-research/vision_transformer, big_vision) -------------------------------
def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))


def _block_keys(w: dict[str, np.ndarray], i: int) -> dict[str, np.ndarray]:
    """Parameters of encoder block ``i`` with module names normalised to ``LayerNorm_a``/``LayerNorm_b``...

    The original code names them LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3;
    big_vision LayerNorm_0, LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0, and may store all
    blocks stacked along axis 0 under ``encoderblock/`` (``scan=True``). Order, not index, tells them apart.
    """
    own = f"{_T}encoderblock_{i}/"
    if any(k.startswith(own) for k in w):
        sub = {k[len(own) :]: v for k, v in w.items() if k.startswith(own)}
    else:
        scanned = f"{_T}encoderblock/"
        sub = {k[len(scanned) :]: v[i] for k, v in w.items() if k.startswith(scanned)}
    if not sub:
        raise ValueError(f"npz has no parameters for encoder block {i}")
    lns = sorted({m.group(0) for k in sub for m in [re.match(r"LayerNorm_\d+", k)] if m}, key=lambda s: int(s[10:]))
    if len(lns) != 2:
        raise ValueError(f"encoder block {i} has LayerNorms {lns}; expected two")
    out = {}
    for k, v in sub.items():
        k = k.replace(lns[0] + "/", "ln1/").replace(lns[1] + "/", "ln2/")
        k = re.sub(r"^MultiHeadDotProductAttention_\d+/", "attn/", k)
        k = re.sub(r"^MlpBlock_\d+/", "mlp/", k)
        out[k] = v
    return out


def _load_npz(path_or_file: PathOrFile) -> dict[str, np.ndarray]:
    if isinstance(path_or_file, (str, os.PathLike)) and not Path(path_or_file).is_file():
        raise FileNotFoundError(f"npz checkpoint not found: {path_or_file}")
    with np.load(path_or_file, allow_pickle=False) as z:
        w = {k: z[k] for k in z.files}
    # Some exports nest everything under "params/" or "opt/target/"; strip down to the model's keys.
    anchor = next((k for k in w if k.endswith("embedding/kernel") and "posembed" not in k), None)
    if anchor is None:
        raise ValueError("npz has no 'embedding/kernel': not a ViT checkpoint in the original layout")
    prefix = anchor[: -len("embedding/kernel")]
    return {k[len(prefix) :]: v for k, v in w.items() if k.startswith(prefix)}


def _npz_hybrid(w: dict[str, np.ndarray], sd: dict[str, torch.Tensor]) -> HybridConfig | None:
    if "conv_root/kernel" not in w:
        return None
    sd["patch_embed.backbone.conv_root.weight"] = _t(w["conv_root/kernel"]).permute(3, 2, 0, 1)
    sd["patch_embed.backbone.gn_root.weight"] = _t(w["gn_root/scale"])
    sd["patch_embed.backbone.gn_root.bias"] = _t(w["gn_root/bias"])
    layers = []
    while any(k.startswith(f"block{len(layers) + 1}/") for k in w):
        s = len(layers) + 1
        n = 0
        while f"block{s}/unit{n + 1}/conv1/kernel" in w:
            n += 1
        layers.append(n)
        for u in range(n):
            src, dst = f"block{s}/unit{u + 1}/", f"patch_embed.backbone.stages.{s - 1}.{u}."
            for k, v in w.items():
                if k.startswith(src):
                    mod, p = k[len(src) :].split("/")
                    if p == "kernel":
                        sd[f"{dst}{mod}.weight"] = _t(v).permute(3, 2, 0, 1)
                    else:
                        sd[f"{dst}{mod}.{'weight' if p == 'scale' else 'bias'}"] = _t(v)
    width = w["conv_root/kernel"].shape[-1]
    return HybridConfig(layers=tuple(layers), width=int(width))


def from_npz(path_or_file: PathOrFile, **overrides: Any) -> tuple[ViTConfig, dict[str, torch.Tensor]]:
    """Read an original-layout ViT ``.npz`` (``np.load(allow_pickle=False)``) → (ViTConfig, state_dict).

    The config comes from the array shapes: width, depth, heads, MLP size, patch size, class token,
    pre-logits and head sizes; the grid is the square of the position-embedding rows (the original code's
    assumption). GELU is "tanh" (flax ``nn.gelu``). ``overrides`` set fields the file cannot tell
    (e.g. ``dropout``) or correct the grid via ``img_size`` for non-square checkpoints.
    """
    w = _load_npz(path_or_file)
    sd: dict[str, torch.Tensor] = {}
    hybrid = _npz_hybrid(w, sd)
    kernel = w["embedding/kernel"]  # HWIO
    k, _, cin, width = kernel.shape
    sd["patch_embed.proj.weight"] = _t(kernel).permute(3, 2, 0, 1)
    sd["patch_embed.proj.bias"] = _t(w["embedding/bias"])
    if "cls" in w:
        sd["cls_token"] = _t(w["cls"]).reshape(1, 1, width)
    pe_key = next((c for c in (f"{_T}posembed_input/pos_embedding", "pos_embedding") if c in w), None)
    if pe_key is None:
        raise ValueError("npz has no position embedding (Transformer/posembed_input/pos_embedding)")
    pe = _t(w[pe_key]).reshape(1, -1, width)
    sd["pos_embed"] = pe
    depth = 0
    while any(k_.startswith(f"{_T}encoderblock_{depth}/") for k_ in w):
        depth += 1
    if depth == 0 and any(k_.startswith(f"{_T}encoderblock/") for k_ in w):
        depth = int(w[f"{_T}encoderblock/LayerNorm_0/scale"].shape[0])
    heads = mlp_dim = 0
    for i in range(depth):
        b, p = _block_keys(w, i), f"blocks.{i}."
        heads = b["attn/query/kernel"].shape[1]
        mlp_dim = b["mlp/Dense_0/kernel"].shape[1]
        sd[p + "norm1.weight"], sd[p + "norm1.bias"] = _t(b["ln1/scale"]), _t(b["ln1/bias"])
        sd[p + "norm2.weight"], sd[p + "norm2.bias"] = _t(b["ln2/scale"]), _t(b["ln2/bias"])
        # (D, heads, head_dim) kernels → torch (out, in) rows, stacked q, k, v.
        sd[p + "attn.qkv.weight"] = torch.cat(
            [_t(b[f"attn/{n}/kernel"]).reshape(width, width).T for n in ("query", "key", "value")]
        )
        if "attn/query/bias" in b:
            sd[p + "attn.qkv.bias"] = torch.cat(
                [_t(b[f"attn/{n}/bias"]).reshape(width) for n in ("query", "key", "value")]
            )
        sd[p + "attn.proj.weight"] = _t(b["attn/out/kernel"]).reshape(width, width).T
        sd[p + "attn.proj.bias"] = _t(b["attn/out/bias"])
        for j, fc in ((0, "fc1"), (1, "fc2")):
            sd[p + f"mlp.{fc}.weight"] = _t(b[f"mlp/Dense_{j}/kernel"]).T
            sd[p + f"mlp.{fc}.bias"] = _t(b[f"mlp/Dense_{j}/bias"])
    sd["norm.weight"], sd["norm.bias"] = _t(w[f"{_T}encoder_norm/scale"]), _t(w[f"{_T}encoder_norm/bias"])
    rep = None
    if "pre_logits/kernel" in w:
        rep = int(w["pre_logits/kernel"].shape[1])
        sd["pre_logits_fc.weight"], sd["pre_logits_fc.bias"] = _t(w["pre_logits/kernel"]).T, _t(w["pre_logits/bias"])
    num_classes = 0
    if "head/kernel" in w:
        num_classes = int(w["head/kernel"].shape[1])
        sd["head.weight"], sd["head.bias"] = _t(w["head/kernel"]).T, _t(w["head/bias"])
    if "MAPHead_0/probe" in w:
        raise ValueError("npz uses a MAP head (pool='map'), which vitpipe does not implement")
    class_token = "cls" in w
    n = pe.shape[1] - int(class_token)
    side = round(n**0.5)
    if side * side != n and "img_size" not in overrides:
        raise ValueError(f"npz has {n} patch position embeddings (not a square); pass img_size=(h, w)")
    patch = k * (hybrid.stride if hybrid else 1)
    in_chans = cin if hybrid is None else w["conv_root/kernel"].shape[2]
    fields: dict[str, Any] = dict(
        width=int(width), depth=depth, num_heads=int(heads), mlp_dim=int(mlp_dim), patch_size=int(patch),
        img_size=side * patch, num_classes=num_classes, in_chans=int(in_chans),
        pool="token" if class_token else "gap", class_token=class_token, representation_size=rep,
        gelu="tanh", layernorm_eps=1e-6, qkv_bias="blocks.0.attn.qkv.bias" in sd, hybrid=hybrid,
    )  # fmt: skip
    fields.update(overrides)
    return ViTConfig(**fields), sd


def to_npz(cfg: ViTConfig, state_dict: dict[str, torch.Tensor], path_or_file: PathOrFile) -> None:
    """Write ``state_dict`` in the original vision_transformer ``.npz`` layout (inverse of ``from_npz``)."""
    D, H = cfg.width, cfg.num_heads
    hd = D // H
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in state_dict.items()}
    out: dict[str, np.ndarray] = {}

    def put(key: str, t: torch.Tensor) -> None:
        out[key] = t.contiguous().numpy()

    put("embedding/kernel", sd["patch_embed.proj.weight"].permute(2, 3, 1, 0))
    put("embedding/bias", sd["patch_embed.proj.bias"])
    bb = "patch_embed.backbone."
    for k, v in sd.items():
        if not k.startswith(bb):
            continue
        name = k[len(bb) :]
        m = re.match(r"stages\.(\d+)\.(\d+)\.(\w+)\.(weight|bias)$", name)
        mod, p = (f"block{int(m[1]) + 1}/unit{int(m[2]) + 1}/{m[3]}", m[4]) if m else tuple(name.split("."))
        if mod.split("/")[-1].startswith("conv"):
            put(f"{mod}/kernel", v.permute(2, 3, 1, 0))
        else:
            put(f"{mod}/{'scale' if p == 'weight' else 'bias'}", v)
    if "cls_token" in sd:
        put("cls", sd["cls_token"])
    put(f"{_T}posembed_input/pos_embedding", sd["pos_embed"])
    for i in range(cfg.depth):
        p, o = f"blocks.{i}.", f"{_T}encoderblock_{i}/"
        for ln, name in (("norm1", "LayerNorm_0"), ("norm2", "LayerNorm_2")):
            put(f"{o}{name}/scale", sd[f"{p}{ln}.weight"])
            put(f"{o}{name}/bias", sd[f"{p}{ln}.bias"])
        a = f"{o}MultiHeadDotProductAttention_1/"
        for j, n in enumerate(("query", "key", "value")):
            put(f"{a}{n}/kernel", sd[f"{p}attn.qkv.weight"][j * D : (j + 1) * D].T.reshape(D, H, hd))
            if cfg.qkv_bias:
                put(f"{a}{n}/bias", sd[f"{p}attn.qkv.bias"][j * D : (j + 1) * D].reshape(H, hd))
        put(f"{a}out/kernel", sd[f"{p}attn.proj.weight"].T.reshape(H, hd, D))
        put(f"{a}out/bias", sd[f"{p}attn.proj.bias"])
        for j, fc in ((0, "fc1"), (1, "fc2")):
            put(f"{o}MlpBlock_3/Dense_{j}/kernel", sd[f"{p}mlp.{fc}.weight"].T)
            put(f"{o}MlpBlock_3/Dense_{j}/bias", sd[f"{p}mlp.{fc}.bias"])
    put(f"{_T}encoder_norm/scale", sd["norm.weight"])
    put(f"{_T}encoder_norm/bias", sd["norm.bias"])
    if "pre_logits_fc.weight" in sd:
        put("pre_logits/kernel", sd["pre_logits_fc.weight"].T)
        put("pre_logits/bias", sd["pre_logits_fc.bias"])
    if "head.weight" in sd:
        put("head/kernel", sd["head.weight"].T)
        put("head/bias", sd["head.bias"])
    if isinstance(path_or_file, (str, os.PathLike)):
        np.savez(path_or_file, **out)
    else:
        buf = io.BytesIO()
        np.savez(buf, **out)
        path_or_file.write(buf.getvalue())
