"""Full-data logistic-regression probe against scikit-learn's LogisticRegression (same objective, same scaling),
and the λ choice on a held-out slice of train."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from vitpipe.jobs.evals.linear_probe import LinearProbeConfig, fit_logistic, linear_eval
from vitpipe.pipeline.tasks import stratified_holdout

# Agreement with scikit-learn at tol=1e-10 on these features: the optimum is unique (strictly convex in W, the
# unpenalised biases sum to zero from a zero start in both), so both solvers land on it up to the tolerance.
PROBA_ATOL = 1e-5
COEF_ATOL = 1e-4


@pytest.fixture(scope="module")
def feats():
    """Random projection of digits to 40 dims (plus a constant feature, which standardisation must leave alone)."""
    d = load_digits()
    rng = np.random.default_rng(1)
    x = d.data @ rng.normal(size=(64, 40)) / 8 + 0.1 * rng.normal(size=(len(d.target), 40))
    x = np.concatenate([x, np.full((len(d.target), 1), 3.0)], axis=1).astype(np.float32)
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.3, stratify=d.target, random_state=0)
    return x[tr], d.target[tr], x[te], d.target[te]


def sklearn_fit(xtr, ytr, l2):
    """Independent reference: StandardScaler + LogisticRegression with C = 1 / (λ n) (its objective is
    C * sum(loss) + ||W||² / 2, i.e. n C (mean loss + ||W||² / (2 n C)))."""
    sc = StandardScaler().fit(xtr.astype(np.float64))
    clf = LogisticRegression(C=1.0 / (l2 * len(ytr)), tol=1e-10, max_iter=20_000)
    clf.fit(sc.transform(xtr.astype(np.float64)), ytr)
    return sc, clf


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_fit_matches_sklearn_logistic_regression(feats, l2):
    xtr, ytr, xte, _ = feats
    probe = fit_logistic(xtr, ytr, 10, l2, tol=1e-10, max_iter=5000)
    sc, clf = sklearn_fit(xtr, ytr, l2)
    assert probe.grad_max <= 1e-7  # L-BFGS-B may stop on ftol just above gtol, as in scikit-learn
    np.testing.assert_allclose(probe.weight.numpy().T, clf.coef_, atol=COEF_ATOL)
    np.testing.assert_allclose(probe.bias.numpy() - probe.bias.numpy().mean(),
                               clf.intercept_ - clf.intercept_.mean(), atol=COEF_ATOL)
    np.testing.assert_allclose(probe.mean.numpy(), sc.mean_, rtol=1e-6)
    np.testing.assert_allclose(probe.scale.numpy(), sc.scale_, rtol=1e-6)  # the constant column stays at 1
    z = sc.transform(xte.astype(np.float64))
    np.testing.assert_allclose(probe.predict_proba(xte), clf.predict_proba(z), atol=PROBA_ATOL)
    np.testing.assert_array_equal(probe.predict(xte), clf.predict(z))


def test_warm_start_and_float32_reach_the_same_optimum(feats):
    xtr, ytr, xte, _ = feats
    cold = fit_logistic(xtr, ytr, 10, 1e-2, tol=1e-9)
    warm = fit_logistic(xtr, ytr, 10, 1e-2, tol=1e-9, init=fit_logistic(xtr, ytr, 10, 1e-1))
    np.testing.assert_allclose(warm.weight.numpy(), cold.weight.numpy(), atol=1e-5)
    f32 = fit_logistic(xtr, ytr, 10, 1e-2, tol=1e-5, dtype=torch.float32)  # float32 gradients bottom out ~1e-5
    assert f32.weight.dtype == torch.float32 and f32.grad_max <= 1e-5
    np.testing.assert_allclose(f32.predict_proba(xte), cold.predict_proba(xte), atol=1e-3)


class FeatTask:
    name = "digits_feats"
    classes = [str(i) for i in range(10)]

    def __init__(self, xtr, ytr, xte, yte):
        self.x = {"train": xtr, "test": xte}
        self.train_labels, self.test_labels = ytr, yte
        self.calls = []

    def embed(self, split, indices):
        self.calls.append((split, len(indices)))
        return self.x[split][indices]


def test_l2_chosen_on_held_out_train_slice_then_refit(feats):
    xtr, ytr, xte, yte = feats
    grid = (1e-4, 1e-2, 1.0)
    task = FeatTask(*feats)
    res = linear_eval(task.embed, task, LinearProbeConfig(l2_grid=grid, tol=1e-10, max_iter=5000))
    # Test features are read once, after the choice; train once (all of it).
    assert task.calls == [("train", len(ytr)), ("test", len(yte))]

    fit, held = stratified_holdout(ytr, 0.10, 0)  # 1,257 training images: the paper's 10% for small sets
    ref_val = {}
    for l2 in grid:
        sc, clf = sklearn_fit(xtr[fit], ytr[fit], l2)
        ref_val[l2] = np.mean(clf.predict(sc.transform(xtr[held].astype(np.float64))) == ytr[held])
        assert res[f"digits_feats/linear/l2_{l2:g}/val_acc"] == ref_val[l2]
    best = max(sorted(grid, reverse=True), key=ref_val.get)
    assert res["digits_feats/linear/l2"] == best and res["digits_feats/linear/val_acc"] == ref_val[best]
    assert res["digits_feats/linear/holdout_size"] == len(held) == 126
    sc, clf = sklearn_fit(xtr, ytr, best)
    assert res["digits_feats/linear/test_acc"] == np.mean(clf.predict(sc.transform(xte.astype(np.float64))) == yte)
    assert list(res)[-2:] == ["digits_feats/linear/l2", "digits_feats/linear/test_acc"]


def test_single_l2_skips_the_choice_and_limits_subsample(feats):
    task = FeatTask(*feats)
    res = linear_eval(task.embed, task, LinearProbeConfig(l2_grid=(1e-2,), train_limit=400, test_limit=100))
    assert set(res) == {"digits_feats/linear/l2", "digits_feats/linear/test_acc"}
    assert task.calls == [("train", 400), ("test", 100)]


def test_config_validation():
    with pytest.raises(ValueError, match="LinearProbeConfig.l2_grid must be positive numbers"):
        LinearProbeConfig(l2_grid=(0.1, -1))
    with pytest.raises(ValueError, match="LinearProbeConfig.l2_grid must be distinct"):
        LinearProbeConfig(l2_grid=(0.1, 0.1))
    with pytest.raises(ValueError, match="LinearProbeConfig.holdout_fraction must be in"):
        LinearProbeConfig(holdout_fraction=1.5)
    with pytest.raises(ValueError, match="LinearProbeConfig.dtype must be one of"):
        LinearProbeConfig(dtype="float16")
    assert LinearProbeConfig(l2_grid=[1, 2]).l2_grid == (1.0, 2.0)
    with pytest.raises(ValueError, match="labels must lie in"):
        fit_logistic(np.ones((3, 2)), np.array([0, 1, 4]), 3, 1.0)
