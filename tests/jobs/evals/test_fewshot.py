"""Few-shot evaluator: sampling, what gets embedded, caching, metric names and values."""

from dataclasses import dataclass, field

import numpy as np
import pytest

from vitpipe.jobs.evals.fewshot import FeatureCache, FewshotConfig, fewshot_eval, sample_shots, summarize


@dataclass
class BlobTask:
    """Synthetic task: class c's features are a Gaussian blob around centre c (features stand in for images)."""

    name: str = "blobs"
    num_classes: int = 4
    n_train: int = 400
    n_test: int = 300
    dim: int = 16
    noise: float = 0.5
    seed: int = 0
    classes: list = field(init=False)

    def __post_init__(self):
        rng = np.random.default_rng(self.seed)
        self.classes = [f"c{i}" for i in range(self.num_classes)]
        self.centres = rng.normal(size=(self.num_classes, self.dim)) * 3
        self.train_labels = rng.integers(0, self.num_classes, self.n_train)
        self.test_labels = rng.integers(0, self.num_classes, self.n_test)
        self.feats = {
            "train": self.centres[self.train_labels] + self.noise * rng.normal(size=(self.n_train, self.dim)),
            "test": self.centres[self.test_labels] + self.noise * rng.normal(size=(self.n_test, self.dim)),
        }


class CountingEmbed:
    """embed_fn that records every (split, indices) it is asked for."""

    def __init__(self, task):
        self.task, self.calls = task, []

    def __call__(self, split, indices):
        self.calls.append((split, np.asarray(indices).copy()))
        return self.task.feats[split][indices].astype(np.float32)

    def embedded(self, split):
        return sum(len(i) for s, i in self.calls if s == split)


def test_sample_shots_deterministic_balanced_and_nested():
    labels = np.random.default_rng(0).integers(0, 5, 500)
    a = sample_shots(labels, 10, seed=3)
    np.testing.assert_array_equal(a, sample_shots(labels, 10, seed=3))
    assert not np.array_equal(a, sample_shots(labels, 10, seed=4))
    assert np.bincount(labels[a], minlength=5).tolist() == [10] * 5
    assert len(set(a.tolist())) == a.size
    # big_vision's nesting: each class's k=5 sample is a prefix of its k=10 sample for the same seed.
    small = sample_shots(labels, 5, seed=3).reshape(5, 5)
    np.testing.assert_array_equal(small, a.reshape(5, 10)[:, :5])


def test_sample_shots_errors_name_the_class():
    labels = np.array([0, 0, 0, 1, 2, 2])
    with pytest.raises(ValueError, match="class 1 has 1 training examples, fewer than k=2"):
        sample_shots(labels, 2, seed=0)
    with pytest.raises(ValueError, match="class 3 has 0"):
        sample_shots(labels, 1, seed=0, num_classes=4)


def test_config_validation():
    with pytest.raises(ValueError, match="fewshot.shots"):
        FewshotConfig(shots=(0, 5))
    with pytest.raises(ValueError, match="fewshot.representation"):
        FewshotConfig(representation="cls")
    with pytest.raises(ValueError, match="fewshot.l2_reg"):
        FewshotConfig(l2_reg=-1)
    assert FewshotConfig(shots=[1, 5], l2_sweep=[1, 10]).l2_sweep == (1.0, 10.0)


def test_eval_embeds_only_needed_images_once_and_reports_each_seed():
    task = BlobTask()
    embed = CountingEmbed(task)
    cfg = FewshotConfig(shots=(1, 5, 10), seeds=(0, 1, 2))
    res = fewshot_eval(embed, task, cfg)
    # One call per split; train embeds exactly the union of the samples (nested: the k=10 samples of each seed).
    assert [s for s, _ in embed.calls] == ["train", "test"]
    union = np.unique(np.concatenate([sample_shots(task.train_labels, 10, s) for s in (0, 1, 2)]))
    np.testing.assert_array_equal(embed.calls[0][1], union)
    assert embed.embedded("test") == task.n_test
    for k in (1, 5, 10):
        seeds = [res[f"blobs/{k}shot/seed{s}"] for s in (0, 1, 2)]
        assert all(0.0 <= a <= 1.0 for a in seeds)
        assert res[f"blobs/{k}shot/mean"] == pytest.approx(np.mean(seeds))
        assert res[f"blobs/{k}shot/std"] == pytest.approx(np.std(seeds, ddof=1))
    assert res["blobs/10shot/mean"] > 0.95  # separable blobs
    assert summarize(res, "blobs") == {k: (res[f"blobs/{k}shot/mean"], res[f"blobs/{k}shot/std"]) for k in (1, 5, 10)}


def test_eval_accuracy_matches_direct_probe_per_seed():
    from vitpipe.jobs.evals.ridge import ridge_fit_predict

    task = BlobTask(noise=3.0)  # hard enough that accuracies differ between seeds
    res = fewshot_eval(CountingEmbed(task), task, FewshotConfig(shots=(5,), seeds=(7,), l2_reg=3.0))
    idx = sample_shots(task.train_labels, 5, 7)
    pred = ridge_fit_predict(task.feats["train"][idx], task.train_labels[idx], task.feats["test"], 4, 3.0)
    assert res["blobs/5shot/seed7"] == pytest.approx(np.mean(pred == task.test_labels))
    assert 0.3 < res["blobs/5shot/seed7"] < 1.0


def test_cache_second_run_embeds_only_new_shots(tmp_path):
    task = BlobTask()
    cache = FeatureCache(str(tmp_path / "feats"))
    first = CountingEmbed(task)
    r1 = fewshot_eval(first, task, FewshotConfig(shots=(1, 5)), cache, model_key="m1", resolution=32)
    assert first.embedded("test") == task.n_test
    # Same config again: nothing is embedded, identical numbers.
    again = CountingEmbed(task)
    assert fewshot_eval(again, task, FewshotConfig(shots=(1, 5)), cache, model_key="m1", resolution=32) == r1
    assert again.calls == []
    # More shots: only train images not embedded before, and no test images.
    more = CountingEmbed(task)
    r3 = fewshot_eval(more, task, FewshotConfig(shots=(1, 5, 25)), cache, model_key="m1", resolution=32)
    assert [s for s, _ in more.calls] == ["train"]
    old = np.unique(np.concatenate([sample_shots(task.train_labels, 5, s) for s in (0, 1, 2)]))
    assert not np.isin(more.calls[0][1], old).any()
    assert r3["blobs/5shot/mean"] == r1["blobs/5shot/mean"]
    # Another model key or resolution is another entry.
    other = CountingEmbed(task)
    fewshot_eval(other, task, FewshotConfig(shots=(1,)), cache, model_key="m2", resolution=32)
    assert other.embedded("test") == task.n_test


def test_cache_ignores_an_interrupted_entry(tmp_path):
    task = BlobTask()
    cache = FeatureCache(str(tmp_path))
    embed = CountingEmbed(task)
    key = dict(model_key="m", task="blobs", resolution=None, representation="gap")
    cache.features(embed, "test", np.arange(10), **key)
    meta = tmp_path / "m" / "blobs" / "test-rany-gap" / "meta.json"
    assert meta.exists()
    meta.unlink()  # as if the writer died before committing
    out = cache.features(embed, "test", np.array([3, 1]), **key)
    np.testing.assert_allclose(out, task.feats["test"][[3, 1]].astype(np.float32))
    assert embed.embedded("test") == 12


def test_cache_on_fsspec_memory_url():
    task = BlobTask()
    cache = FeatureCache("memory://vitpipe-test-feats")
    embed = CountingEmbed(task)
    key = dict(model_key="m", task="blobs", resolution=48, representation="pre_logits")
    a = cache.features(embed, "train", np.array([5, 2, 9]), **key)
    b = cache.features(embed, "train", np.array([9, 5]), **key)
    np.testing.assert_array_equal(b, a[[2, 0]])
    assert embed.embedded("train") == 3


def test_cache_needs_model_key(tmp_path):
    task = BlobTask()
    with pytest.raises(ValueError, match="model_key"):
        fewshot_eval(CountingEmbed(task), task, FewshotConfig(), FeatureCache(str(tmp_path)))


def test_l2_sweep_reports_each_lambda_and_loo_choice():
    task = BlobTask(noise=2.0)
    cfg = FewshotConfig(shots=(1, 10), seeds=(0, 1), l2_sweep=(0.1, 1024.0, 1e6))
    res = fewshot_eval(CountingEmbed(task), task, cfg)
    for lam in ("l2_0.1", "l2_1024", "l2_1e06"):
        assert 0.0 <= res[f"blobs/10shot/{lam}/mean"] <= 1.0
    assert res["blobs/10shot/l2_1024/mean"] == pytest.approx(res["blobs/10shot/mean"])
    assert res["blobs/10shot/loo/l2_seed0"] in (0.1, 1024.0, 1e6)
    assert 0.0 <= res["blobs/10shot/loo/mean"] <= 1.0
    assert "blobs/1shot/loo/mean" not in res  # leave-one-out is meaningless with one example per class


def test_test_limit_embeds_a_fixed_subset():
    task = BlobTask()
    embed = CountingEmbed(task)
    fewshot_eval(embed, task, FewshotConfig(shots=(1,), seeds=(0,), test_limit=50))
    test_idx = embed.calls[1][1]
    assert test_idx.size == 50 and np.all(np.diff(test_idx) > 0)
