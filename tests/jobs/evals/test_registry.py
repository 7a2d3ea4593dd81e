"""Evaluator registry: configs by type, one feature fetch per split for all evaluators, validation views that reuse
their task's cached features and never read its test split."""

import numpy as np
import pytest

from vitpipe.jobs.evals.features import FeatureCache
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval
from vitpipe.jobs.evals.knn import KnnConfig, knn_eval
from vitpipe.jobs.evals.linear_probe import LinearProbeConfig, linear_eval
from vitpipe.jobs.evals.registry import EVALUATORS, FeatureMemo, evaluator_config, run_evaluator, run_evaluators
from vitpipe.pipeline.tasks import _TaskBase

EVALS = [("fewshot", {"shots": [1, 5], "seeds": [0, 1]}), ("knn", {"ks": [5, 20]}),
         ("linear", {"l2_grid": [1e-3, 1e-1]})]


class BlobTask(_TaskBase):
    """A pipeline task whose "images" are feature vectors (Gaussian blobs per class); every read is recorded."""

    def __init__(self, n_train=300, n_test=120, num_classes=4, dim=12, seed=0):
        rng = np.random.default_rng(seed)
        self.name, self.classes = "blobs", [f"c{i}" for i in range(num_classes)]
        centres = rng.normal(size=(num_classes, dim)) * 1.5
        self.train_labels = rng.integers(0, num_classes, n_train)
        self.test_labels = rng.integers(0, num_classes, n_test)
        self.x = {s: (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
                  for s, y in (("train", self.train_labels), ("test", self.test_labels))}
        self.reads = []

    def _raw(self, split, i):
        self.reads.append((split, i))
        return self.x[split][i]


def embed_fn(task):
    """What make_embed_fn does for a pipeline task, with the identity as the model: read each image via _raw
    (a view's _raw goes through its base)."""
    return lambda split, indices: np.stack([task._raw(split, int(i)) for i in indices])


def direct(task, evals=EVALS):
    """Reference: each evaluator called on its own, no cache, no memo."""
    fns = {"fewshot": fewshot_eval, "knn": knn_eval, "linear": linear_eval}
    out = {}
    for t, cfg in evals:
        out.update(fns[t](embed_fn(task), task, EVALUATORS[t].config(**cfg)))
    return out


def test_all_evaluators_share_one_fetch_per_split_and_match_direct_calls():
    task = BlobTask()
    ref = direct(task)
    task.reads.clear()
    got = dict(run_evaluators(EVALS, embed_fn(task), task))
    assert got == ref and any(k.startswith("blobs/knn/") for k in got) and "blobs/linear/test_acc" in got
    # Every train and test image read exactly once for all three evaluators.
    assert sorted(task.reads) == sorted([("train", i) for i in range(300)] + [("test", i) for i in range(120)])


def test_validation_view_reuses_cached_task_features_and_never_reads_test(tmp_path):
    task = BlobTask()
    val = task.validation(fraction=0.2, seed=1)
    ref = direct(val)
    assert {s for s, _ in task.reads} == {"train"}  # the view reads only the base's train split

    cache = FeatureCache(str(tmp_path / "cache"))
    task.reads.clear()
    base_res = dict(run_evaluators(EVALS, embed_fn(task), task, cache=cache, model_key="m1", resolution=32))
    assert len(task.reads) == 420
    task.reads.clear()
    got = dict(run_evaluators(EVALS, embed_fn(val), val, cache=cache, model_key="m1", resolution=32))
    assert task.reads == []                       # every feature came from the base task's cache entry
    assert got == ref and all(k.startswith("blobs.val/") for k in got)
    assert set(base_res) == {k.replace("blobs.val/", "blobs/") for k in got}
    assert sorted(p.name for p in (tmp_path / "cache" / "m1").iterdir()) == ["blobs"]  # no entry for the view

    # A fresh cache: the view embeds only base train images (its "test" is a held-out slice of train).
    task.reads.clear()
    again = dict(run_evaluators(EVALS, embed_fn(val), val, cache=FeatureCache(str(tmp_path / "c2")), model_key="m1"))
    assert again == ref and {s for s, _ in task.reads} == {"train"} and len(task.reads) == 300


def test_shared_memo_spans_calls_and_keys_by_model():
    task = BlobTask()
    memo = FeatureMemo()
    a = dict(run_evaluator("knn", embed_fn(task), task, {"ks": [5]}, memo=memo, model_key="m1"))
    n = len(task.reads)
    b = dict(run_evaluator("knn", embed_fn(task), task, KnnConfig(ks=(5,)), memo=memo, model_key="m1"))
    assert a == b and len(task.reads) == n        # second call: nothing read
    run_evaluator("knn", embed_fn(task), task, {"ks": [5]}, memo=memo, model_key="m2").__next__()
    assert len(task.reads) == 2 * n               # another model key: its own features


def test_config_resolution_and_errors(tmp_path):
    assert evaluator_config("knn", {"ks": [5, 10]}) == KnnConfig(ks=(5, 10))
    assert evaluator_config("linear") == LinearProbeConfig()
    fc = FewshotConfig(shots=(5,))
    assert evaluator_config("fewshot", fc) is fc
    task = BlobTask()
    with pytest.raises(ValueError, match=r"unknown evaluator type 'svm'; known: \['fewshot', 'knn', 'linear'\]"):
        run_evaluator("svm", embed_fn(task), task)
    with pytest.raises(ValueError, match=r"knn evaluator config has unknown field\(s\) \['k'\]"):
        run_evaluators([("fewshot", None), ("knn", {"k": 5})], embed_fn(task), task)
    with pytest.raises(ValueError, match="knn evaluator config must be a KnnConfig or a mapping, got FewshotConfig"):
        evaluator_config("knn", fc)
    with pytest.raises(ValueError, match="needs a model_key"):  # raised at the call, before any iteration
        run_evaluator("knn", embed_fn(task), task, cache=FeatureCache(str(tmp_path)))
    with pytest.raises(ValueError, match="KnnConfig.ks"):
        run_evaluators([("knn", {"ks": [0]})], embed_fn(task), task)
    assert task.reads == []
