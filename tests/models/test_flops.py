"""Analytic params/MACs against module parameter counts and the paper's ViT-B/16 figure."""

import pytest
import torch

from vitpipe.models import ViTConfig, create, flops, variant_table


def test_b16_forward_macs_at_224():
    f = flops(ViTConfig.from_name("B/16"))
    assert f["fwd_macs"] / 1e9 == pytest.approx(17.6, abs=0.05)
    assert f["fwd_flops"] == 2 * f["fwd_macs"] and f["train_flops"] == 3 * f["fwd_flops"]
    assert f["seq_len"] == 197


def test_img_size_argument_scales_sequence():
    cfg = ViTConfig.from_name("B/16")
    assert flops(cfg, img_size=384)["seq_len"] == 577
    assert flops(cfg, img_size=384)["fwd_macs"] > 3 * flops(cfg)["fwd_macs"]


def test_macs_match_a_counting_forward_for_a_small_model():
    """Count matmul/conv MACs with a TorchDispatchMode over a real forward and compare."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ViTConfig.from_name("mu/4", img_size=(16, 24), num_classes=7, representation_size=32)
    model = create(cfg).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        # The explicit attention path: the counter has no formula for the CPU SDPA kernel.
        tokens, _ = model.forward_features(torch.randn(1, 3, 16, 24), return_attn=True)
        model.forward_head(tokens)
    assert counter.get_total_flops() == flops(cfg)["fwd_flops"]


@pytest.mark.parametrize(
    "name, kw",
    [
        ("Ti/4", dict(img_size=32, num_classes=10)),
        ("S/16", dict(img_size=(224, 160), pool="gap", representation_size=100)),
        ("B/32", dict(num_classes=0, qkv_bias=False)),
        ("R50+B/16", dict(img_size=384)),
        ("R26+S/32", dict(num_classes=21843)),
    ],
)
def test_analytic_params_equal_module_params(name, kw):
    cfg = ViTConfig.from_name(name, **kw)
    with torch.device("meta"):
        model = create(cfg)
    assert flops(cfg)["params"] == sum(p.numel() for p in model.parameters())


def test_variant_table_rows():
    rows = {r["name"]: r for r in variant_table()}
    assert {"Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32", "H/14", "R50+B/16"} <= set(rows)
    assert rows["B/16"]["params"] == 86_567_656 and rows["B/16"]["gflops"] == pytest.approx(35.13, abs=0.01)
    assert rows["H/14"]["params"] == 632_045_800
