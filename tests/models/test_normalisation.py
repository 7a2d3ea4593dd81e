"""Input normalisation folded into the patch embedding: the same function on the other normalisation, exactly."""

from __future__ import annotations

import pytest
import torch

from vitpipe.models import ViTConfig, create, fold_input_normalisation, is_default_normalisation

MEAN, STD = (0.49, 0.48, 0.45), (0.247, 0.243, 0.261)  # CIFAR-10-like statistics


def test_folded_model_on_half_normalised_input_equals_original_on_its_own():
    torch.manual_seed(0)
    model = create(ViTConfig.from_name("mu/4", img_size=16, num_classes=10)).eval()
    folded = create(ViTConfig.from_name("mu/4", img_size=16, num_classes=10)).eval()
    folded.load_state_dict(fold_input_normalisation(model.state_dict(), MEAN, STD))
    u = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # pixels in [0, 1]
    m, s = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model.pre_logits((u - m) / s)
        got = folded.pre_logits((u - 0.5) / 0.5)
        assert not torch.allclose(model.pre_logits((u - 0.5) / 0.5), want, atol=1e-3)  # the fold is not a no-op
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    # only the patch embedding changed
    sd0, sd1 = model.state_dict(), folded.state_dict()
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}
    assert changed == {"patch_embed.proj.weight", "patch_embed.proj.bias"}


def test_fold_round_trips_and_knows_the_default():
    sd = create(ViTConfig.from_name("mu/4", img_size=16, num_classes=10)).state_dict()
    back = fold_input_normalisation(fold_input_normalisation(sd, MEAN, STD), (0.5,) * 3, (0.5,) * 3, MEAN, STD)
    torch.testing.assert_close(back["patch_embed.proj.weight"], sd["patch_embed.proj.weight"])
    torch.testing.assert_close(back["patch_embed.proj.bias"], sd["patch_embed.proj.bias"], atol=1e-6, rtol=0)
    assert is_default_normalisation((0.5, 0.5, 0.5), [0.5, 0.5, 0.5])
    assert not is_default_normalisation(MEAN, STD)


def test_fold_refuses_what_it_cannot_rewrite_exactly():
    sd = create(ViTConfig.from_name("mu/4", img_size=16, num_classes=10)).state_dict()
    with pytest.raises(ValueError, match="hybrid ResNet stem"):
        fold_input_normalisation({k: v for k, v in sd.items() if not k.startswith("patch_embed")}, MEAN, STD)
    with pytest.raises(ValueError, match="3-channel patch kernel"):
        fold_input_normalisation(sd, (0.5,), (0.5,))
    with pytest.raises(ValueError, match="must be positive"):
        fold_input_normalisation(sd, MEAN, (0.2, 0.0, 0.2))
