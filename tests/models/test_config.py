"""ViTConfig: name decoding, overrides, validation, JSON round-trip."""

import json

import pytest

from vitpipe.models import VARIANTS, HybridConfig, ViTConfig, decode_variant


@pytest.mark.parametrize(
    "name, width, depth, heads, mlp, patch",
    [
        ("Ti/16", 192, 12, 3, 768, 16),
        ("S/4", 384, 12, 6, 1536, 4),
        ("B/16", 768, 12, 12, 3072, 16),
        ("B/32", 768, 12, 12, 3072, 32),
        ("L/16", 1024, 24, 16, 4096, 16),
        ("L/32", 1024, 24, 16, 4096, 32),
        ("H/14", 1280, 32, 16, 5120, 14),
        ("ViT-B/16", 768, 12, 12, 3072, 16),
        ("mu/4", 64, 2, 2, 256, 4),
    ],
)
def test_decode_paper_sizes(name, width, depth, heads, mlp, patch):
    cfg = ViTConfig.from_name(name)
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.patch_size) == (width, depth, heads, mlp, patch)
    assert cfg.hybrid is None and cfg.pool == "token" and cfg.class_token and cfg.num_prefix_tokens == 1


def test_hybrid_name_and_stride():
    cfg = ViTConfig.from_name("R50+B/16")
    assert cfg.hybrid == HybridConfig(layers=(3, 4, 9), width=64)
    assert cfg.hybrid.stride == 16 and cfg.hybrid.out_channels == 1024 and cfg.grid_size == (14, 14)
    assert ViTConfig.from_name("R26+S/32").hybrid.stride == 32
    with pytest.raises(ValueError, match="not a multiple of the hybrid backbone stride"):
        ViTConfig.from_name("R50+B/8")


def test_overrides_any_field_and_patch_override_wins():
    cfg = ViTConfig.from_name("S/4", img_size=32, num_classes=10, depth=6, pool="gap", gelu="exact")
    assert (cfg.depth, cfg.num_classes, cfg.grid_size, cfg.pool, cfg.class_token) == (6, 10, (8, 8), "gap", False)
    assert ViTConfig.from_name("B/16", patch_size=8).patch_size == 8


@pytest.mark.parametrize(
    "name, kw, match",
    [
        ("Q/16", {}, "unknown ViT variant"),
        ("B/16", {"widht": 3}, "unknown ViTConfig field"),
        ("B/16", {"img_size": 100}, "not a multiple of patch_size"),
        ("B/16", {"num_heads": 5}, "does not divide width"),
        ("B/16", {"pool": "max"}, "pool must be"),
        ("B/16", {"gelu": "relu"}, "gelu must be"),
        ("B/16", {"dropout": 1.0}, "dropout must be in"),
        ("B/16", {"pool": "token", "class_token": False}, "needs class_token"),
        ("B", {}, "names no patch size"),
        ("B", {"patch_size": 0}, "patch_size must be a positive int"),
        ("R99+B/16", {}, "unknown hybrid backbone"),
    ],
)
def test_validation_errors_are_one_line_value_errors(name, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        ViTConfig.from_name(name, **kw)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "cfg",
    [
        ViTConfig.from_name("Ti/4", img_size=32, num_classes=10),
        ViTConfig.from_name("B/16", img_size=(384, 192), representation_size=768, pool="gap", drop_path=0.1),
        ViTConfig.from_name("R50+B/16", img_size=(64, 96), num_classes=0, classifier_bias_init=-10.0),
    ],
)
def test_dict_round_trip_is_exact_and_json_safe(cfg):
    d = json.loads(json.dumps(cfg.to_dict()))
    assert ViTConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        ViTConfig.from_dict({**d, "bogus": 1})


def test_non_square_grid_and_variant_table_keys():
    cfg = ViTConfig.from_name("S/16", img_size=(224, 160))
    assert cfg.grid_size == (14, 10) and cfg.seq_len == 141
    assert set(VARIANTS) >= {"Ti", "S", "B", "L", "H"}
    assert decode_variant("L/14")["patch_size"] == 14
