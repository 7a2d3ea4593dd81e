"""Checkpoint converters: original .npz layout (synthetic file + independent numpy forward) and HF transformers."""

import io

import numpy as np
import pytest
import torch
from needs import need_module

from vitpipe.models import HybridConfig, ViTConfig, create
from vitpipe.models.convert import from_hf, from_npz, to_npz

D, HEADS, M, P, C, DEPTH, CLASSES, REP = 32, 4, 64, 4, 3, 2, 5, 24
GRID = 3  # 12 px images


def _synthetic_npz(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random weights in the google-research/vision_transformer key layout and shapes."""
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.3  # noqa: E731
    hd = D // HEADS
    w = {
        "embedding/kernel": r(P, P, C, D),
        "embedding/bias": r(D),
        "cls": r(1, 1, D),
        "Transformer/posembed_input/pos_embedding": r(1, 1 + GRID * GRID, D),
        "Transformer/encoder_norm/scale": 1 + r(D),
        "Transformer/encoder_norm/bias": r(D),
        "pre_logits/kernel": r(D, REP),
        "pre_logits/bias": r(REP),
        "head/kernel": r(REP, CLASSES),
        "head/bias": r(CLASSES),
    }
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[f"{b}{ln}/scale"], w[f"{b}{ln}/bias"] = 1 + r(D), r(D)
        a = f"{b}MultiHeadDotProductAttention_1/"
        for n in ("query", "key", "value"):
            w[f"{a}{n}/kernel"], w[f"{a}{n}/bias"] = r(D, HEADS, hd), r(HEADS, hd)
        w[f"{a}out/kernel"], w[f"{a}out/bias"] = r(HEADS, hd, D), r(D)
        w[f"{b}MlpBlock_3/Dense_0/kernel"], w[f"{b}MlpBlock_3/Dense_0/bias"] = r(D, M), r(M)
        w[f"{b}MlpBlock_3/Dense_1/kernel"], w[f"{b}MlpBlock_3/Dense_1/bias"] = r(M, D), r(D)
    return w


def _reference_forward(w: dict[str, np.ndarray], x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The original flax model written out in numpy (float64): returns (pre_logits, logits)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def ln(t, p):
        mu, var = t.mean(-1, keepdims=True), t.var(-1, keepdims=True)
        return (t - mu) / np.sqrt(var + 1e-6) * w[p + "/scale"] + w[p + "/bias"]

    def gelu_tanh(t):  # flax nn.gelu(approximate=True)
        return 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))

    B, H, W, _ = x_nhwc.shape
    patches = x_nhwc.reshape(B, H // P, P, W // P, P, C).transpose(0, 1, 3, 2, 4, 5).reshape(B, -1, P * P * C)
    t = patches @ w["embedding/kernel"].reshape(P * P * C, D) + w["embedding/bias"]
    t = np.concatenate([np.broadcast_to(w["cls"], (B, 1, D)), t], 1) + w["Transformer/posembed_input/pos_embedding"]
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        y = ln(t, b + "LayerNorm_0")
        q, k, v = (np.einsum("btd,dhk->bthk", y, w[a + n + "/kernel"]) + w[a + n + "/bias"] for n in ("query", "key", "value"))
        logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(D // HEADS)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        o = np.einsum("bhqs,bshk->bqhk", att, v)
        t = t + np.einsum("bqhk,hkd->bqd", o, w[a + "out/kernel"]) + w[a + "out/bias"]
        y = ln(t, b + "LayerNorm_2")
        y = gelu_tanh(y @ w[b + "MlpBlock_3/Dense_0/kernel"] + w[b + "MlpBlock_3/Dense_0/bias"])
        t = t + y @ w[b + "MlpBlock_3/Dense_1/kernel"] + w[b + "MlpBlock_3/Dense_1/bias"]
    t = ln(t, "Transformer/encoder_norm")
    pre = np.tanh(t[:, 0] @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return pre, pre @ w["head/kernel"] + w["head/bias"]


def test_from_npz_matches_independent_reference_forward(tmp_path):
    w = _synthetic_npz(np.random.default_rng(0))
    path = tmp_path / "vit.npz"
    np.savez(path, **w)
    cfg, sd = from_npz(path)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (D, DEPTH, HEADS, M, P)
    assert (cfg.img_size, cfg.num_classes, cfg.representation_size, cfg.gelu, cfg.pool) == (12, CLASSES, REP, "tanh", "token")
    model = create(cfg).eval()
    model.load_state_dict(sd)
    x = np.random.default_rng(1).standard_normal((2, 12, 12, C))
    ref_pre, ref_logits = _reference_forward(w, x)
    xt = torch.from_numpy(x).float().permute(0, 3, 1, 2)
    with torch.no_grad():
        np.testing.assert_allclose(model.pre_logits(xt).numpy(), ref_pre, atol=1e-5)
        np.testing.assert_allclose(model(xt).numpy(), ref_logits, atol=1e-4)


def test_npz_round_trip_is_exact():
    w = _synthetic_npz(np.random.default_rng(2))
    buf = io.BytesIO()
    np.savez(buf, **w)
    buf.seek(0)
    cfg, sd = from_npz(buf)
    out = io.BytesIO()
    to_npz(cfg, sd, out)
    out.seek(0)
    with np.load(out, allow_pickle=False) as z:
        back = {k: z[k] for k in z.files}
    assert back.keys() == w.keys()
    for k in w:
        np.testing.assert_array_equal(back[k], w[k], err_msg=k)


def test_big_vision_scanned_layout_gives_the_same_state_dict():
    w = _synthetic_npz(np.random.default_rng(3))
    scanned = {k: v for k, v in w.items() if "encoderblock_" not in k}
    # big_vision: LayerNorm_0/LayerNorm_1, MultiHeadDotProductAttention_0, MlpBlock_0, blocks stacked on axis 0.
    rename = {"LayerNorm_2": "LayerNorm_1", "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0", "MlpBlock_3": "MlpBlock_0"}
    for k in w:
        if k.startswith("Transformer/encoderblock_0/"):
            rest = k[len("Transformer/encoderblock_0/") :]
            for a, b in rename.items():
                rest = rest.replace(a, b)
            scanned["params/Transformer/encoderblock/" + rest] = np.stack(
                [w[k.replace("encoderblock_0", f"encoderblock_{i}")] for i in range(DEPTH)]
            )
    scanned = {(k if k.startswith("params/") else "params/" + k): v for k, v in scanned.items()}
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    np.savez(buf_a, **w)
    np.savez(buf_b, **scanned)
    buf_a.seek(0)
    buf_b.seek(0)
    (cfg_a, sd_a), (cfg_b, sd_b) = from_npz(buf_a), from_npz(buf_b)
    assert cfg_a == cfg_b and sd_a.keys() == sd_b.keys()
    for k in sd_a:
        torch.testing.assert_close(sd_a[k], sd_b[k], rtol=0, atol=0, msg=k)


def test_hybrid_npz_round_trip_through_model(tmp_path):
    torch.manual_seed(0)
    cfg = ViTConfig(width=64, depth=1, num_heads=2, mlp_dim=128, patch_size=8, img_size=32, num_classes=3,
                    hybrid=HybridConfig(layers=(1, 2), width=32))  # fmt: skip
    model = create(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # move zero-initialised tensors off zero
    to_npz(cfg, model.state_dict(), tmp_path / "hybrid.npz")
    with np.load(tmp_path / "hybrid.npz") as z:
        assert {"conv_root/kernel", "gn_root/scale", "block2/unit1/conv_proj/kernel", "block2/unit2/gn3/bias"} <= set(z.files)
    cfg2, sd = from_npz(tmp_path / "hybrid.npz")
    assert cfg2 == cfg
    clone = create(cfg2).eval()
    clone.load_state_dict(sd)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        from_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a ViT checkpoint"):
        from_npz(tmp_path / "other.npz")


# ---- HF transformers ------------------------------------------------------------------------------
transformers = need_module("transformers", reason="HF parity needs transformers (test extra)")


def _hf_config(**kw):
    base = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                image_size=(16, 24), patch_size=8, num_labels=7)  # fmt: skip
    return transformers.ViTConfig(**{**base, **kw})


def _randomise(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 and p.shape[0] == 48 else 0.0))
    return model.eval()


def _to_v4_names(sd):
    """Key names as saved by transformers 4 (the layout of every ViT checkpoint on the Hub)."""
    ren = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
           "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}  # fmt: skip
    out = {}
    for k, v in sd.items():
        k = k.replace("layers.", "encoder.layer.")
        for a, b in ren.items():
            k = k.replace(a, b)
        out[k] = v
    return out


@pytest.mark.parametrize("v4_names", [False, True])
def test_hf_vit_model_parity_pre_logits(v4_names):
    hc = _hf_config()
    hf = _randomise(transformers.ViTModel(hc))
    sd_hf = _to_v4_names(hf.state_dict()) if v4_names else hf.state_dict()
    cfg, sd = from_hf(sd_hf, hc)
    assert (cfg.gelu, cfg.layernorm_eps, cfg.representation_size, cfg.num_classes) == ("exact", 1e-12, 48, 0)
    model = create(cfg).eval()
    model.load_state_dict(sd)
    x = torch.randn(3, 3, 16, 24)
    with torch.no_grad():
        out = hf(pixel_values=x)
        assert (model.forward_features(x) - out.last_hidden_state).abs().max() <= 1e-5
        assert (model.pre_logits(x) - out.pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
def test_hf_image_classification_parity_logits(act, tmp_path):
    hc = _hf_config(hidden_act=act, layer_norm_eps=1e-6)
    hf = _randomise(transformers.ViTForImageClassification(hc))
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hc.to_json_file(tmp_path / "config.json")
    cfg, sd = from_hf(tmp_path / "pytorch_model.bin", tmp_path / "config.json")  # paths: torch.load(weights_only)
    assert cfg.num_classes == 7 and cfg.representation_size is None and cfg.grid_size == (2, 3)
    model = create(cfg).eval()
    model.load_state_dict(sd)
    x = torch.randn(3, 3, 16, 24)
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        assert (model(x) - out.logits).abs().max() <= 1e-5
        assert (model.pre_logits(x) - hf.vit.layernorm(out.hidden_states[-1])[:, 0]).abs().max() <= 1e-5


def test_hf_without_config_infers_shapes_and_rejects_foreign_keys():
    hc = _hf_config(num_attention_heads=3, hidden_size=192, intermediate_size=384, image_size=16)  # 192/64 = 3
    hf = transformers.ViTForImageClassification(hc)
    cfg, _ = from_hf(hf.state_dict())
    assert (cfg.width, cfg.num_heads, cfg.mlp_dim, cfg.img_hw) == (192, 3, 384, (16, 16))  # square assumed
    non_square = transformers.ViTModel(_hf_config()).state_dict()  # 2x3 grid cannot be guessed
    with pytest.raises(ValueError, match="not a square grid"):
        from_hf(non_square)
    assert from_hf(non_square, img_size=(16, 24))[0].grid_size == (2, 3)
    with pytest.raises(ValueError, match="unconverted HF keys"):
        from_hf({**hf.state_dict(), "vit.extra.weight": torch.zeros(1)}, hc)
    with pytest.raises(ValueError, match="not an HF ViT"):
        from_hf({"foo": torch.zeros(1)})
