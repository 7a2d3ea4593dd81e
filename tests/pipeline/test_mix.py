"""Mixup / CutMix / label smoothing: label arithmetic against independent references, determinism from
(seed, step, rank), purity, config validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitpipe.pipeline import MixConfig, mix_batch, smooth_targets
from vitpipe.pipeline.mix import draw_mix

B, C, H, W, K = 6, 3, 12, 10, 5


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, C, H, W, generator=g)  # distinct random images: a pixel's source is recoverable
    labels = torch.tensor([0, 3, 1, 4, 4, 2])
    return images, labels


def onehot(labels, k=K):
    y = np.zeros((len(labels), k))
    y[np.arange(len(labels)), np.asarray(labels)] = 1
    return y


def test_smooth_targets_int_and_multi_hot():
    t = smooth_targets(torch.tensor([2, 0]), 4, 0.2)
    assert t.dtype == torch.float32 and torch.allclose(t, torch.tensor([[0.05, 0.05, 0.85, 0.05],
                                                                        [0.85, 0.05, 0.05, 0.05]]))
    assert torch.allclose(t.sum(1), torch.ones(2))
    mh = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.allclose(smooth_targets(mh, 4, 0.2), torch.tensor([[0.85, 0.05, 0.85, 0.05], [0.05] * 4]))
    assert torch.equal(smooth_targets(mh, 4), mh)
    with pytest.raises(ValueError, match=r"labels must be \(B,\) indices or \(B, 4\) multi-hot, got shape \(2, 3\)"):
        smooth_targets(torch.zeros(2, 3), 4)


def test_mixup_label_and_pixel_arithmetic():
    images, labels = batch()
    for step in range(5):
        out, t = mix_batch(images, labels, num_classes=K, mixup_alpha=0.4, seed=1, step=step, rank=0)
        d = draw_mix(H, W, mixup_alpha=0.4, cutmix_alpha=0.0, seed=1, step=step, rank=0)
        lam = d.lam
        assert d.kind == "mixup" and 0.5 <= lam <= 1.0
        x = images.double().numpy()
        assert np.allclose(out.numpy(), lam * x + (1 - lam) * x[::-1], atol=1e-6)
        y = onehot(labels)
        assert np.allclose(t.numpy(), lam * y + (1 - lam) * y[::-1], atol=1e-6)
        assert np.allclose(t.sum(1).numpy(), 1.0)


def test_cutmix_box_and_area_corrected_lambda():
    images, labels = batch()
    partner = images.flip(0)
    clipped = 0
    for step in range(40):
        out, t = mix_batch(images, labels, num_classes=K, cutmix_alpha=1.0, label_smoothing=0.1, seed=3, step=step)
        # where each pixel came from, read off the output itself (independent of the drawn box)
        own = (out == images).all(1)
        pasted = (out == partner).all(1) & ~own
        assert torch.equal(own | pasted, torch.ones_like(own))
        frac = pasted[0].double().mean().item()
        assert all(pasted[i].double().mean().item() == frac for i in range(B))  # one box for the batch
        ys, xs = np.nonzero(pasted[0].numpy())
        if len(ys):  # a rectangle
            assert pasted[0, ys.min():ys.max() + 1, xs.min():xs.max() + 1].all()
            clipped += ys.min() == 0 or xs.min() == 0 or ys.max() == H - 1 or xs.max() == W - 1
        lam = 1 - frac
        y = onehot(labels) * 0.9 + 0.1 / K
        assert np.allclose(t.numpy(), lam * y + (1 - lam) * y[::-1], atol=1e-6)
        assert np.allclose(t.sum(1).numpy(), 1.0)
    assert clipped > 5  # boxes cut at the border were exercised (lam then differs from the drawn Beta value)


def test_multi_hot_targets_mix_per_class():
    images, _ = batch()
    mh = torch.zeros(B, K)
    mh[0, [0, 2]] = mh[1, 1] = mh[2, [3, 4]] = mh[4, 0] = 1.0  # row 3 and 5: no label at all
    out, t = mix_batch(images, mh, num_classes=K, mixup_alpha=1.0, label_smoothing=0.1, seed=5, step=7)
    lam = draw_mix(H, W, mixup_alpha=1.0, cutmix_alpha=0.0, seed=5, step=7).lam
    y = mh.double().numpy() * 0.9 + 0.1 / K
    assert np.allclose(t.numpy(), lam * y + (1 - lam) * y[::-1], atol=1e-6)


def test_deterministic_per_seed_step_rank_and_pure():
    images, labels = batch()
    before = images.clone()
    kw = dict(num_classes=K, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=0.8, label_smoothing=0.1)
    a = [mix_batch(images, labels, seed=0, step=s, rank=1, **kw) for s in range(30)]
    b = [mix_batch(images, labels, seed=0, step=s, rank=1, **kw) for s in range(30)]  # a resumed run
    assert all(torch.equal(x1, x2) and torch.equal(t1, t2) for (x1, t1), (x2, t2) in zip(a, b))
    assert torch.equal(images, before)  # inputs untouched
    draws = [draw_mix(H, W, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, seed=0, step=s, rank=1) for s in range(30)]
    other = [draw_mix(H, W, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, seed=0, step=s, rank=0) for s in range(30)]
    assert {d.kind for d in draws} == {"none", "mixup", "cutmix"} and draws != other  # ranks draw independently
    assert draws != [draw_mix(H, W, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, seed=1, step=s, rank=1)
                     for s in range(30)]


def test_switches_and_off_states():
    images, labels = batch()
    kinds = lambda **kw: {draw_mix(H, W, seed=0, step=s, **kw).kind for s in range(20)}  # noqa: E731
    assert kinds(mixup_alpha=0.5, cutmix_alpha=1.0, switch_prob=0.0) == {"mixup"}
    assert kinds(mixup_alpha=0.5, cutmix_alpha=1.0, switch_prob=1.0) == {"cutmix"}
    assert kinds(mixup_alpha=0.0, cutmix_alpha=1.0, switch_prob=0.0) == {"cutmix"}
    assert kinds(mixup_alpha=0.5, cutmix_alpha=1.0, prob=0.0) == {"none"}
    assert kinds(mixup_alpha=0.0, cutmix_alpha=0.0) == {"none"}
    out, t = mix_batch(images, labels, num_classes=K, label_smoothing=0.2, seed=0, step=0)
    assert out is images and np.allclose(t.numpy(), onehot(labels) * 0.8 + 0.2 / K)


def test_mixup_alpha_is_the_beta_concentration():
    """Beta(1, 1) is uniform, so max(lam, 1 - lam) has mean 3/4 (sd 0.144: 4000 draws give +-0.0023)."""
    lams = [draw_mix(H, W, mixup_alpha=1.0, cutmix_alpha=0.0, seed=0, step=s).lam for s in range(4000)]
    assert abs(np.mean(lams) - 0.75) < 0.01
    small = [draw_mix(H, W, mixup_alpha=0.1, cutmix_alpha=0.0, seed=0, step=s).lam for s in range(4000)]
    assert np.mean(small) > 0.9  # Beta(0.1, 0.1) puts most mass near 0 and 1


def test_mix_config_validation_and_mix():
    with pytest.raises(ValueError, match="MixConfig.mixup_alpha must be >= 0, got -1"):
        MixConfig(mixup_alpha=-1)
    with pytest.raises(ValueError, match=r"MixConfig.switch_prob must be in \[0, 1\], got 1.5"):
        MixConfig(switch_prob=1.5)
    with pytest.raises(ValueError, match=r"MixConfig.label_smoothing must be in \[0, 1\), got 1.0"):
        MixConfig(label_smoothing=1.0)
    assert not MixConfig().mixing and not MixConfig(cutmix_alpha=1.0, prob=0.0).mixing
    cfg = MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    images, labels = batch()
    x1, t1 = cfg.mix(images, labels, num_classes=K, seed=2, step=9, rank=3)
    x2, t2 = mix_batch(images, labels, num_classes=K, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1,
                       seed=2, step=9, rank=3)
    assert torch.equal(x1, x2) and torch.equal(t1, t2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mix_on_cuda_matches_cpu():
    images, labels = batch()
    for step in range(6):
        kw = dict(num_classes=K, mixup_alpha=0.5, cutmix_alpha=1.0, label_smoothing=0.1, seed=0, step=step)
        x, t = mix_batch(images, labels, **kw)
        xc, tc = mix_batch(images.cuda(), labels.cuda(), **kw)
        assert xc.is_cuda and tc.is_cuda
        assert torch.allclose(xc.cpu(), x, atol=1e-6) and torch.allclose(tc.cpu(), t, atol=1e-6)
