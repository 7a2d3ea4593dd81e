"""Weighted kNN probe: predictions against scikit-learn's KNeighborsClassifier, chunking, names, limits, errors."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

from vitpipe.jobs.evals.knn import KnnConfig, knn_eval, knn_predict


@pytest.fixture(scope="module")
def digits_feats():
    """Real-ish frozen features: a random projection of scikit-learn's digits to 32 dims plus a little noise
    (digits has exact duplicate images; the noise keeps neighbour similarities distinct, so no rank ties)."""
    d = load_digits()
    rng = np.random.default_rng(0)
    x = d.data @ rng.normal(size=(64, 32)) + 0.05 * rng.normal(size=(len(d.target), 32))
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.3, stratify=d.target, random_state=0)
    return x[tr].astype(np.float32), d.target[tr], x[te].astype(np.float32), d.target[te]


def sklearn_knn(xtr, ytr, xte, k, temperature):
    """DINO's vote through scikit-learn: cosine distance d = 1 - sim, weight exp(sim / T) = exp((1 - d) / T)."""
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda dist: np.exp((1.0 - dist) / temperature))
    clf.fit(xtr.astype(np.float64), ytr)
    return clf.predict(xte.astype(np.float64)), clf.predict_proba(xte.astype(np.float64))


@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_predictions_equal_sklearn_weighted_cosine_knn(digits_feats, temperature):
    xtr, ytr, xte, _ = digits_feats
    ks = (1, 5, 20, 50)
    got = knn_predict(xtr, ytr, xte, 10, ks, temperature)
    for k in ks:
        ref, proba = sklearn_knn(xtr, ytr, xte, k, temperature)
        top2 = np.sort(proba, axis=1)[:, -2:]
        if k > 1:  # the comparison is about the vote: make sure no class pair is (numerically) tied
            assert (top2[:, 1] - top2[:, 0]).min() > 1e-5
        np.testing.assert_array_equal(got[k], ref)
    # Not a trivial classifier: DINO's vote differs from the plain majority vote somewhere at k=50.
    plain = KNeighborsClassifier(n_neighbors=50, metric="cosine", algorithm="brute").fit(xtr, ytr).predict(xte)
    if temperature == 0.07:
        assert (plain != got[50]).sum() > 0


def test_chunking_does_not_change_predictions(digits_feats):
    xtr, ytr, xte, _ = digits_feats
    whole = knn_predict(xtr, ytr, xte, 10, (3, 20), 0.07, chunk_size=len(xte))
    for chunk in (1, 7, 128):
        parts = knn_predict(xtr, ytr, xte, 10, (3, 20), 0.07, chunk_size=chunk)
        for k in (3, 20):
            np.testing.assert_array_equal(parts[k], whole[k])
    tiny = knn_predict(xtr, ytr, xte, 10, (20,), 0.07, chunk_mb=1)  # 1 MiB / (4 B x 1257 train) = 208 rows
    np.testing.assert_array_equal(tiny[20], whole[20])


def test_tiny_temperature_stays_finite_and_is_the_nearest_neighbour(digits_feats):
    xtr, ytr, xte, _ = digits_feats
    got = knn_predict(xtr, ytr, xte, 10, (20,), 1e-4)[20]  # exp(1 / 1e-4) overflows without the row-max shift
    ref, _ = sklearn_knn(xtr, ytr, xte, 1, 1.0)
    # At T = 1e-4 the vote is the nearest neighbour's unless the second is within ~T * ln(20) of it: compare where
    # the top-2 cosine gap (float64) is clear of that.
    sims = (xte / np.linalg.norm(xte, axis=1, keepdims=True)).astype(np.float64) @ (
        xtr / np.linalg.norm(xtr, axis=1, keepdims=True)).astype(np.float64).T
    top2 = np.sort(sims, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 5e-4  # 19 * exp(-5e-4 / 1e-4) < 1
    assert clear.sum() > 450
    np.testing.assert_array_equal(got[clear], ref[clear])


class FeatTask:
    """Features stand in for images: embed_fn reads rows of fixed arrays."""

    name = "digits_feats"
    classes = [str(i) for i in range(10)]

    def __init__(self, xtr, ytr, xte, yte):
        self.x = {"train": xtr, "test": xte}
        self.train_labels, self.test_labels = ytr, yte
        self.calls = []

    def embed(self, split, indices):
        self.calls.append((split, np.asarray(indices).copy()))
        return self.x[split][indices]


def test_evaluator_names_values_and_limits(digits_feats):
    xtr, ytr, xte, yte = digits_feats
    task = FeatTask(*digits_feats)
    res = knn_eval(task.embed, task, KnnConfig(ks=(20, 5)))
    assert list(res) == ["digits_feats/knn/k20", "digits_feats/knn/k5"]
    for k in (5, 20):
        ref, _ = sklearn_knn(xtr, ytr, xte, k, 0.07)
        assert res[f"digits_feats/knn/k{k}"] == np.mean(ref == yte)
    assert [s for s, _ in task.calls] == ["train", "test"]
    np.testing.assert_array_equal(task.calls[0][1], np.arange(len(ytr)))

    task.calls.clear()
    lim = knn_eval(task.embed, task, KnnConfig(ks=(5,), train_limit=300, test_limit=100, seed=3))
    tr_idx, te_idx = task.calls[0][1], task.calls[1][1]
    assert len(tr_idx) == 300 and len(te_idx) == 100 and np.all(np.diff(tr_idx) > 0)
    ref, _ = sklearn_knn(xtr[tr_idx], ytr[tr_idx], xte[te_idx], 5, 0.07)
    assert lim["digits_feats/knn/k5"] == np.mean(ref == yte[te_idx])


def test_config_and_argument_errors(digits_feats):
    with pytest.raises(ValueError, match="KnnConfig.ks must be distinct positive ints"):
        KnnConfig(ks=(0, 5))
    with pytest.raises(ValueError, match="KnnConfig.temperature must be a positive number"):
        KnnConfig(temperature=0)
    with pytest.raises(ValueError, match="KnnConfig.representation"):
        KnnConfig(representation="cls")
    assert KnnConfig(ks=[10, 20]).ks == (10, 20)
    task = FeatTask(*digits_feats)
    with pytest.raises(ValueError, match="k=500 exceeds the 300 training images of task digits_feats"):
        knn_eval(task.embed, task, KnnConfig(ks=(500,), train_limit=300))
    with pytest.raises(ValueError, match="labels must lie in"):
        knn_predict(np.ones((3, 2)), np.array([0, 1, 5]), np.ones((1, 2)), 3, (1,))


def test_direct_feature_cache_use_embeds_once(digits_feats, tmp_path):
    from vitpipe.jobs.evals.features import FeatureCache

    task = FeatTask(*digits_feats)
    cache = FeatureCache(str(tmp_path))
    first = knn_eval(task.embed, task, KnnConfig(ks=(5,)), cache, model_key="m", resolution=8)
    n = len(task.calls)
    assert knn_eval(task.embed, task, KnnConfig(ks=(5,)), cache, model_key="m", resolution=8) == first
    assert len(task.calls) == n == 2
    with pytest.raises(ValueError, match="needs a model_key"):
        knn_eval(task.embed, task, KnnConfig(), cache)
