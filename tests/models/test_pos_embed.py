"""resize_pos_embed against scipy.ndimage.zoom(order=1) and load_pretrained across resolutions."""

import numpy as np
import pytest
import torch
from needs import need_module

from vitpipe.models import ViTConfig, create, load_pretrained, resize_pos_embed

ndimage = need_module("scipy.ndimage", reason="scipy is the independent reference for the resize")


def _zoom_reference(posemb: np.ndarray, old, new, prefix: int) -> np.ndarray:
    """The original code's resize: scipy zoom (order 1) of the (gh, gw, D) grid, prefix rows kept."""
    tok, grid = posemb[:, :prefix], posemb[0, prefix:].reshape(old[0], old[1], -1)
    zoomed = ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
    assert zoomed.shape[:2] == tuple(new)
    return np.concatenate([tok, zoomed.reshape(1, new[0] * new[1], -1)], axis=1)


@pytest.mark.parametrize(
    "old, new, prefix",
    [((7, 7), (12, 12), 1), ((14, 14), (24, 24), 1), ((8, 8), (5, 5), 1), ((4, 6), (9, 5), 0), ((3, 5), (6, 10), 4)],
)
def test_resize_matches_scipy_zoom_order1(old, new, prefix):
    rng = np.random.default_rng(0)
    pe = rng.standard_normal((1, prefix + old[0] * old[1], 16)).astype(np.float32)
    got = resize_pos_embed(torch.from_numpy(pe), new, old, num_prefix_tokens=prefix)
    ref = _zoom_reference(pe.astype(np.float64), old, new, prefix)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(got[:, :prefix].numpy(), pe[:, :prefix])  # prefix rows untouched


def test_resize_square_default_identity_and_errors():
    pe = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pe, 4) is pe
    assert resize_pos_embed(pe, (6, 6)).shape == (1, 37, 8)
    assert resize_pos_embed(pe.to(torch.bfloat16), (6, 6)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.randn(1, 1 + 12, 8), (4, 4))
    with pytest.raises(ValueError, match="has 12 cells"):
        resize_pos_embed(pe, (4, 4), old_grid=(3, 4))


def test_load_pretrained_to_higher_resolution_and_new_head():
    torch.manual_seed(0)
    src = create("mu/4", img_size=16, num_classes=10, representation_size=64)
    dst = create("mu/4", img_size=(24, 32), num_classes=3)
    info = load_pretrained(dst, src.state_dict(), src.cfg.to_dict())
    assert info["missing"] == ["head.weight", "head.bias"] and info["unexpected"] == []
    assert set(info["dropped"]) == {"head.weight", "head.bias", "pre_logits_fc.weight", "pre_logits_fc.bias"}
    expected = resize_pos_embed(src.pos_embed.detach(), (6, 8), (4, 4))
    torch.testing.assert_close(dst.pos_embed.detach(), expected)
    torch.testing.assert_close(dst.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
    assert torch.count_nonzero(dst.head.weight) == 0


def test_load_pretrained_same_shape_keeps_head_when_asked():
    src = create("mu/4", img_size=16, num_classes=5)
    torch.nn.init.normal_(src.head.weight)
    dst = create("mu/4", img_size=16, num_classes=5)
    info = load_pretrained(dst, src.state_dict(), src.cfg, drop_head=False)
    assert info == {"missing": [], "unexpected": [], "dropped": []}
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(dst.eval()(x), src.eval()(x))


def test_load_pretrained_token_to_gap_drops_class_token_row():
    src = create("mu/4", img_size=16, num_classes=0)
    dst = create("mu/4", img_size=16, num_classes=0, pool="gap")
    info = load_pretrained(dst, src.state_dict(), src.cfg)
    assert "cls_token" in info["dropped"] and info["missing"] == []
    torch.testing.assert_close(dst.pos_embed.detach(), src.pos_embed.detach()[:, 1:])


def test_load_pretrained_rejects_incompatible_checkpoints():
    src = create("mu/4", img_size=16)
    with pytest.raises(ValueError, match="patch_size=4 does not match the model's patch_size=8"):
        load_pretrained(create("mu/8", img_size=16), src.state_dict(), src.cfg)
    wrong = ViTConfig.from_name("mu/4", img_size=32)  # config that does not describe the weights
    with pytest.raises(ValueError, match="pos_embed has 17 rows but its config implies 65"):
        load_pretrained(create("mu/4", img_size=16), src.state_dict(), wrong)


def test_load_pretrained_hybrid_to_non_square_resolution():
    from vitpipe.models import HybridConfig

    hyb = HybridConfig(layers=(1, 1), width=32)
    src = create(ViTConfig(width=64, depth=1, num_heads=2, mlp_dim=128, patch_size=8, img_size=16, hybrid=hyb))
    dst = create(src.cfg.replace(img_size=(24, 40), num_classes=2))
    info = load_pretrained(dst, src.state_dict(), src.cfg.to_dict())
    assert info["missing"] == ["head.weight", "head.bias"] and info["unexpected"] == []
    torch.testing.assert_close(
        dst.patch_embed.backbone.conv_root.weight, src.patch_embed.backbone.conv_root.weight, rtol=0, atol=0
    )
    assert dst.pos_embed.shape == (1, 1 + 3 * 5, 64)
    assert dst(torch.randn(1, 3, 24, 40)).shape == (1, 2)
