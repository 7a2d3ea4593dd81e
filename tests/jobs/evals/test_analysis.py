"""Analysis figures: the numbers against brute-force references, and each PNG produced and non-trivial."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitpipe.jobs.evals import analysis, vit_stats
from vitpipe.models import create


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = create("mu/4", img_size=32, num_classes=10, representation_size=32)
    # A 2-D structured position embedding (as training produces) so the similarity figure has something to show.
    gh, gw = m.grid_size
    rr, cc = torch.meshgrid(torch.arange(gh).float(), torch.arange(gw).float(), indexing="ij")
    freqs = torch.arange(1, m.cfg.width // 4 + 1).float() * 0.35
    grid_pe = torch.cat([torch.sin(rr[..., None] * freqs), torch.cos(rr[..., None] * freqs),
                         torch.sin(cc[..., None] * freqs), torch.cos(cc[..., None] * freqs)], dim=-1)
    with torch.no_grad():
        m.pos_embed[0, 1:] = grid_pe.reshape(gh * gw, -1)
    return m.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 3, 32, 32, generator=g) * 2 - 1
    x[:, 0, 8:20, 10:24] = 0.9  # a bright block so the images are not pure noise
    return x


def _assert_real_png(path, min_kb=8):
    data = open(path, "rb").read()
    assert len(data) > min_kb * 1024, f"{path} is only {len(data)} bytes"
    img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img.reshape(-1, 3).std(axis=0).max() > 10, "figure is (nearly) a single colour"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50


# ---- numbers --------------------------------------------------------------------------------------------------------
def test_principal_components_recover_the_dominant_direction():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3 * 4 * 4, generator=g)
    direction /= direction.norm()
    coeff = torch.randn(64, 1, generator=g) * 10
    w = (coeff * direction + 0.01 * torch.randn(64, 48, generator=g)).reshape(64, 3, 4, 4)
    comps, ratio = vit_stats.filter_principal_components(w, 5)
    assert comps.shape == (5, 3, 4, 4)
    assert abs(float(comps[0].flatten() @ direction)) == pytest.approx(1.0, abs=1e-3)
    assert ratio[0] > 0.99 and torch.all(ratio[:-1] >= ratio[1:])
    with pytest.raises(ValueError, match="n must be in"):
        vit_stats.filter_principal_components(w, 49)


def test_posemb_similarity_matches_brute_force():
    pe = torch.randn(1, 1 + 12, 8)
    sim = vit_stats.posemb_cosine_similarity(pe, 1, (3, 4))
    r, c, r2, c2 = 2, 1, 0, 3
    a, b = pe[0, 1 + r * 4 + c], pe[0, 1 + r2 * 4 + c2]
    assert float(sim[r, c, r2, c2]) == pytest.approx(float(a @ b / a.norm() / b.norm()), abs=1e-6)
    assert torch.allclose(torch.diagonal(sim.reshape(12, 12)), torch.ones(12))


def test_mean_attention_distance_against_explicit_loop():
    grid, p, prefix = (3, 3), 4, 1
    t = prefix + 9
    attn = torch.softmax(torch.randn(2, 2, t, t), dim=-1)
    got = vit_stats.mean_attention_distance([attn], grid, p, prefix)
    pos = [(i // 3 * p, i % 3 * p) for i in range(9)]
    for h in range(2):
        vals = []
        for b in range(2):
            for q in range(9):
                w = attn[b, h, prefix + q, prefix:]
                w = w / w.sum()
                vals.append(sum(float(w[k]) * np.hypot(pos[q][0] - pos[k][0], pos[q][1] - pos[k][1]) for k in range(9)))
        assert float(got[0, h]) == pytest.approx(np.mean(vals), rel=1e-5)
    # Attending only to oneself is distance 0.
    eye = torch.eye(t).expand(1, 1, t, t)
    assert float(vit_stats.mean_attention_distance([eye], grid, p, prefix)[0, 0]) == 0.0


def test_rollout_is_the_product_of_residual_augmented_maps():
    t, grid = 5, (2, 2)
    attns = [torch.softmax(torch.randn(1, 3, t, t), dim=-1) for _ in range(3)]
    joint = torch.eye(t, dtype=torch.float64)
    for a in attns:
        m = 0.5 * torch.eye(t) + 0.5 * a[0].mean(0)
        joint = (m / m.sum(-1, keepdim=True)).double() @ joint
    got = vit_stats.attention_rollout_maps(attns, grid, 1)
    assert torch.allclose(got[0].flatten().double(), joint[0, 1:], atol=1e-6)


# ---- figures --------------------------------------------------------------------------------------------------------
def test_embedding_filters_png(model, tmp_path):
    res = analysis.embedding_filters(model, tmp_path / "filters.png", n=28)
    _assert_real_png(res.path)
    assert 0 < res.metrics["filters/explained_var_total"] <= 1.0


def test_posemb_similarity_png_and_structure(model, tmp_path):
    res = analysis.posemb_similarity(model, tmp_path / "posemb.png")
    _assert_real_png(res.path)
    assert res.metrics["posemb/sim_neighbours"] > res.metrics["posemb/sim_far"]  # the planted 2-D structure


def test_attention_distance_png(model, images, tmp_path):
    res = analysis.attention_distance(model, images, tmp_path / "sub" / "dist.png", batch_size=4)
    _assert_real_png(res.path)
    assert set(res.metrics) == {"attn_dist/layer1", "attn_dist/layer2", "attn_dist/uniform"}
    assert all(0 < v < 32 * 1.5 for v in res.metrics.values())


def test_attention_distance_does_not_depend_on_batching(model, images, tmp_path):
    a = analysis.attention_distance(model, images, tmp_path / "a.png", batch_size=6).metrics
    b = analysis.attention_distance(model, images, tmp_path / "b.png", batch_size=4).metrics
    assert a == pytest.approx(b, rel=1e-5)


def test_attention_rollout_png(model, images, tmp_path):
    res = analysis.attention_rollout(model, images, tmp_path / "rollout.png")
    _assert_real_png(res.path)
    assert res.metrics["rollout/peak_over_mean"] >= 1.0


def test_images_of_the_wrong_size_are_rejected(model, tmp_path):
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        analysis.attention_rollout(model, torch.zeros(2, 3, 48, 48), tmp_path / "x.png")


def test_gap_model_without_class_token(images, tmp_path):
    m = create("mu/4", img_size=32, num_classes=0, pool="gap")
    assert m.num_prefix_tokens == 0
    _assert_real_png(analysis.attention_rollout(m, images, tmp_path / "r.png").path)
    _assert_real_png(analysis.attention_distance(m, images, tmp_path / "d.png").path)


def test_fewshot_curve_png(tmp_path):
    results = {
        "pretrained": {1: (0.18, 0.02), 5: (0.27, 0.01), 10: (0.33, 0.01), 25: (0.39, 0.005)},
        "random init": {1: (0.13, 0.01), 5: (0.17, 0.01), 10: (0.22, 0.01), 25: (0.25, 0.004)},
    }
    res = analysis.fewshot_curve(results, tmp_path / "fewshot.png", task="cifar10", num_classes=10)
    _assert_real_png(res.path)
    assert res.metrics["pretrained/10shot"] == 0.33
    with pytest.raises(ValueError, match="at least one model"):
        analysis.fewshot_curve({}, tmp_path / "none.png", task="x")


def test_finetune_curves_png(tmp_path):
    steps = np.arange(200)
    hist = {
        "lr=0.01/train_loss": list(zip(steps, 2.3 * np.exp(-steps / 80) + 0.1 * np.random.default_rng(0).random(200))),
        "lr=0.03/train_loss": list(zip(steps, 2.3 * np.exp(-steps / 50) + 0.2)),
        "lr=0.01/val_acc": [(s, 0.1 + 0.6 * (1 - np.exp(-s / 60))) for s in range(0, 200, 20)],
    }
    res = analysis.finetune_curves(hist, tmp_path / "ft.png")
    _assert_real_png(res.path)
    assert res.metrics["lr=0.01/val_acc/final"] == pytest.approx(hist["lr=0.01/val_acc"][-1][1])


def test_model_figures_to_fsspec_memory(model, images):
    out = analysis.model_figures(model, images, "memory://vitpipe-figs")
    assert set(out) == {"embedding_filters", "posemb_similarity", "attention_distance", "attention_rollout"}
    import fsspec

    with fsspec.open(out["attention_rollout"].path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_fewshot_vs_step_png(tmp_path):
    curves = {"cifar10.val": {10: [(0, 0.20, 0.01), (100, 0.31, 0.02), (200, 0.30, 0.01)],
                              25: [(0, 0.25, 0.01), (100, 0.36, 0.01), (200, 0.38, 0.005)]},
              "digits.val": {10: [(0, 0.40, 0.03), (200, 0.35, 0.02)]}}
    res = analysis.fewshot_vs_step(curves, tmp_path / "vs_step.png", baselines={"digits.val": {10: 0.41}})
    _assert_real_png(res.path)
    assert res.metrics == {"cifar10.val/10shot/final": 0.30, "cifar10.val/10shot/best": 0.31,
                           "cifar10.val/25shot/final": 0.38, "cifar10.val/25shot/best": 0.38,
                           "digits.val/10shot/final": 0.35, "digits.val/10shot/best": 0.40}
    with pytest.raises(ValueError, match="at least one task with points"):
        analysis.fewshot_vs_step({"x": {10: []}}, tmp_path / "none.png")
