"""VisionTransformer: shapes, exact parameter counts, original-code init, heads, attention paths, checkpointing."""

import math

import pytest
import torch
from torch import nn

from vitpipe.models import VisionTransformer, ViTConfig, create, flops


def _images(b=2, hw=(32, 32), seed=0):
    return torch.randn(b, 3, *hw, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "name, expected",
    [("B/16", 86_567_656), ("L/16", 304_326_632), ("H/14", 632_045_800)],
)
def test_exact_parameter_counts_at_224(name, expected):
    with torch.device("meta"):  # no memory, no init cost
        model = create(name, img_size=224, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert flops(model.cfg)["params"] == expected


def test_core_api_shapes():
    model = create("Ti/4", num_classes=10, img_size=32, depth=6)
    assert isinstance(model, VisionTransformer) and model.cfg.depth == 6
    assert model.num_prefix_tokens == 1 and model.grid_size == (8, 8)
    x = _images()
    assert model.forward_features(x).shape == (2, 65, 192)
    assert model(x).shape == (2, 10)
    assert model.pre_logits(x).shape == (2, 192)
    assert create(model.cfg).cfg == model.cfg
    with pytest.raises(ValueError, match="built for img_size"):
        model(_images(hw=(48, 48)))


def test_non_square_and_gap_pooling():
    model = create("mu/8", img_size=(16, 40), num_classes=3, pool="gap").eval()
    assert model.num_prefix_tokens == 0 and model.grid_size == (2, 5) and model.cls_token is None
    x = _images(hw=(16, 40))
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 10, 64)
    # gap = mean over patch tokens after the final LayerNorm (original vision_transformer ordering)
    torch.testing.assert_close(model.pre_logits(x), tokens.mean(1))


def test_pre_logits_head_and_zero_head_init():
    model = create("mu/4", img_size=16, num_classes=5, representation_size=32, classifier_bias_init=-10.0).eval()
    x = _images(hw=(16, 16))
    tokens = model.forward_features(x)
    feats = model.forward_head(tokens, pre_logits=True)
    torch.testing.assert_close(feats, torch.tanh(model.pre_logits_fc(tokens[:, 0])))
    torch.testing.assert_close(model.pre_logits(x), feats)
    assert feats.shape == (2, 32) and feats.abs().max() <= 1
    # Zero kernel + bias -10: every logit starts at exactly -10 (paper's sigmoid recipe).
    assert torch.equal(model(x), torch.full((2, 5), -10.0))


def test_num_classes_zero_returns_pre_logits():
    model = create("mu/4", img_size=16, num_classes=0).eval()
    x = _images(hw=(16, 16))
    assert isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model(x), model.pre_logits(x))


def test_reset_classifier_drops_pre_logits_and_zero_inits():
    model = create("mu/4", img_size=16, num_classes=5, representation_size=32, classifier_bias_init=-10.0)
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    model.reset_classifier(7)
    assert model.pre_logits_fc is None and model.cfg.representation_size is None and model.cfg.num_classes == 7
    assert model.head.weight.shape == (7, 64)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert "pre_logits_fc.weight" not in model.state_dict()
    assert create(model.cfg).state_dict().keys() == model.state_dict().keys()  # cfg describes the module
    model.reset_classifier(3, drop_pre_logits=False)
    assert model(_images(hw=(16, 16))).shape == (2, 3)


def test_init_matches_original_code():
    torch.manual_seed(0)
    cfg = ViTConfig.from_name("S/16", img_size=64, num_classes=10, representation_size=384)
    model = create(cfg)
    D, M = cfg.width, cfg.mlp_dim
    blk = model.blocks[0]
    # xavier_uniform on each D×D q/k/v block separately: bound sqrt(6 / 2D), variance bound² / 3.
    bound = math.sqrt(6 / (2 * D))
    for part in blk.attn.qkv.weight.chunk(3):
        assert part.abs().max() <= bound and part.abs().max() > 0.98 * bound
        assert part.var().item() == pytest.approx(bound**2 / 3, rel=0.02)
    assert blk.attn.qkv.weight.abs().max() <= bound  # a single (3D, D) xavier would have a smaller bound
    mlp_bound = math.sqrt(6 / (D + M))
    assert blk.mlp.fc1.weight.abs().max() <= mlp_bound and blk.mlp.fc1.weight.abs().max() > 0.98 * mlp_bound
    assert 0 < blk.mlp.fc1.bias.std() < 1e-5 and torch.count_nonzero(blk.attn.qkv.bias) == 0
    # lecun_normal patch kernel: variance 1/fan_in, truncated at 2σ of the underlying normal.
    w = model.patch_embed.proj.weight
    fan_in = 3 * 16 * 16
    assert w.var().item() == pytest.approx(1 / fan_in, rel=0.03)
    assert w.abs().max() <= 2 * math.sqrt(1 / fan_in) / 0.8796 + 1e-6
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.cls_token) == 0
    assert torch.count_nonzero(model.head.weight) == 0
    assert torch.equal(blk.norm1.weight, torch.ones(D)) and blk.norm1.eps == 1e-6


def test_torch_init_is_the_layers_own_defaults():
    """init="torch": the layers' PyTorch defaults (a bare loop's model), not the original code's, from the seed."""
    cfg = ViTConfig.from_name("mu/4", img_size=16, num_classes=10, init="torch")
    torch.manual_seed(0)
    model = create(cfg)
    D = cfg.width
    blk = model.blocks[0]
    bound = 1 / math.sqrt(D)  # kaiming_uniform(a=sqrt(5)) on fan_in D: U(-1/sqrt(D), 1/sqrt(D))
    assert blk.attn.qkv.weight.abs().max() <= bound and blk.attn.qkv.weight.abs().max() > 0.98 * bound
    assert blk.mlp.fc1.bias.abs().max() > 1e-3  # uniform biases, not the original code's N(0, 1e-6)
    assert torch.count_nonzero(model.head.weight) > 0 and torch.count_nonzero(model.cls_token) == 0
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)
    # differs from the original-code init, and is reproducible from the seed
    torch.manual_seed(0)
    jax = create(ViTConfig.from_name("mu/4", img_size=16, num_classes=10))
    assert not torch.equal(jax.blocks[0].attn.qkv.weight, blk.attn.qkv.weight)
    torch.manual_seed(0)
    again = create(cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="ViTConfig.init must be 'jax' or 'torch'"):
        ViTConfig.from_name("mu/4", init="xavier")


@pytest.mark.parametrize("gelu, approximate", [("tanh", "tanh"), ("exact", "none")])
def test_gelu_choice(gelu, approximate):
    model = create("mu/4", img_size=16, gelu=gelu)
    assert model.blocks[0].mlp.act.approximate == approximate


def test_attention_weights_path_matches_sdpa_path():
    model = create("mu/4", img_size=(16, 24), num_classes=3).eval()
    x = _images(hw=(16, 24))
    tokens, attns = model.forward_features(x, return_attn=True)
    torch.testing.assert_close(tokens, model.forward_features(x), atol=1e-5, rtol=1e-5)
    assert len(attns) == 2 and attns[0].shape == (2, 2, 25, 25)
    torch.testing.assert_close(attns[1].sum(-1), torch.ones(2, 2, 25))
    maps = model.attention_maps(x)
    assert not maps[0].requires_grad
    torch.testing.assert_close(maps[0], attns[0])


def test_grad_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    model = create("mu/4", img_size=16, num_classes=4, classifier_bias_init=0.1)
    nn.init.normal_(model.head.weight, std=0.1)
    x, y = _images(4, (16, 16)), torch.tensor([0, 1, 2, 3])

    def grads():
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = grads()
    model.set_grad_checkpointing(True)
    got = grads()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], msg=n)


def test_dropout_and_drop_path_train_vs_eval():
    model = create("mu/4", img_size=16, num_classes=3, dropout=0.1, attn_dropout=0.1, drop_path=0.2)
    assert [b.drop_path for b in model.blocks] == [0.0, pytest.approx(0.2)]
    nn.init.normal_(model.head.weight)
    x = _images(hw=(16, 16))
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_hybrid_r50_b16_forward_and_structure():
    cfg = ViTConfig.from_name("R50+B/16", img_size=32, num_classes=3, depth=1)
    model = create(cfg).eval()
    bb = model.patch_embed.backbone
    assert [len(s) for s in bb.stages] == [3, 4, 9]
    assert model.patch_embed.proj.kernel_size == (1, 1) and model.patch_embed.proj.in_channels == 1024
    assert model.grid_size == (2, 2)
    out = model.forward_features(_images(hw=(32, 32)))
    assert out.shape == (2, 5, 768) and torch.isfinite(out).all()
    # Every unit's last GroupNorm scale starts at zero (unit = projected identity at init).
    assert all(torch.count_nonzero(u.gn3.weight) == 0 for s in bb.stages for u in s)
    assert sum(p.numel() for p in model.parameters()) == flops(cfg)["params"]
