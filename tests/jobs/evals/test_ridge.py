"""The ridge probe against independent closed-form references (numpy normal equations, scikit-learn)."""

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from vitpipe.jobs.evals.ridge import BIAS_CONSTANT, STD_EPS, RidgeProbe, ridge_fit_predict


def _augment(x, mean, std, bias):
    return np.hstack([(x - mean) / std, np.full((x.shape[0], 1), bias)])


def _numpy_reference(x, y, x_test, num_classes, l2, bias=BIAS_CONSTANT):
    """Textbook ridge on the augmented design: W = (X^T X + λI)^-1 X^T Y, solved with numpy (no eigendecomposition)."""
    mean, std = x.mean(0), x.std(0) + STD_EPS
    a = _augment(x, mean, std, bias)
    t = 2.0 * np.eye(num_classes)[y] - 1.0
    w = np.linalg.solve(a.T @ a + l2 * np.eye(a.shape[1]), a.T @ t)
    return w, _augment(x_test, mean, std, bias) @ w


@pytest.mark.parametrize("n,d", [(200, 16), (30, 64), (65, 64)])  # primal, dual, and n == d + 1 (boundary)
@pytest.mark.parametrize("l2", [1.0, 1024.0])
def test_matches_numpy_normal_equations(n, d, l2):
    rng = np.random.default_rng(n * d)
    c = 5
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d) * 3
    y = rng.integers(0, c, size=n)
    x_test = rng.normal(size=(40, d)) * 2
    w_ref, s_ref = _numpy_reference(x, y, x_test, c, l2)
    probe = RidgeProbe(x, y, c)
    np.testing.assert_allclose(probe.weights(l2).numpy(), w_ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(probe.scores(x_test, l2).numpy(), s_ref, rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(ridge_fit_predict(x, y, x_test, c, l2), s_ref.argmax(1))
    # The eigendecomposition route (λ sweeps) gives the same solution as the Cholesky route.
    np.testing.assert_allclose(RidgeProbe(x, y, c).use_eig().weights(l2).numpy(), w_ref, rtol=1e-5, atol=1e-8)


def test_matches_sklearn_ridge_on_augmented_matrix():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(120, 32)), rng.integers(0, 4, size=120)
    x_test = rng.normal(size=(50, 32))
    mean, std = x.mean(0), x.std(0) + STD_EPS
    t = 2.0 * np.eye(4)[y] - 1.0
    # Our bias column is penalised like the others: sklearn without its own (unpenalised) intercept.
    sk = Ridge(alpha=1024.0, fit_intercept=False, solver="cholesky").fit(_augment(x, mean, std, BIAS_CONSTANT), t)
    ours = RidgeProbe(x, y, 4).scores(x_test, 1024.0).numpy()
    np.testing.assert_allclose(ours, sk.predict(_augment(x_test, mean, std, BIAS_CONSTANT)), rtol=1e-5, atol=1e-8)


def test_float32_input_and_torch_tensor_input_agree():
    import torch

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 3, size=50)
    a = RidgeProbe(x, y, 3).scores(x, 10.0)
    b = RidgeProbe(torch.from_numpy(x), torch.from_numpy(y), 3).scores(torch.from_numpy(x), 10.0)
    assert torch.equal(a, b)


def test_linearly_separable_task_is_solved_exactly():
    # Classes are well-separated Gaussian blobs in 64-d: any sensible linear probe gets 100% on fresh test points.
    rng = np.random.default_rng(2)
    c, d = 10, 64
    centres = rng.normal(size=(c, d)) * 10
    y = np.repeat(np.arange(c), 5)
    x = centres[y] + rng.normal(size=(y.size, d))
    y_test = rng.integers(0, c, size=2000)
    x_test = centres[y_test] + rng.normal(size=(y_test.size, d))
    assert np.mean(ridge_fit_predict(x, y, x_test, c) == y_test) == 1.0


def test_loo_accuracy_matches_explicit_refits():
    rng = np.random.default_rng(3)
    c = 3
    for n, d in [(60, 6), (12, 20)]:
        x = rng.normal(size=(n, d)) + np.eye(c, d)[rng.integers(0, c, size=n)] * 2
        y = rng.integers(0, c, size=n)
        probe = RidgeProbe(x, y, c)
        for l2 in (0.5, 50.0):
            # Refit without each point on the full-sample standardisation (the statistics LOO keeps fixed).
            a = probe.x.numpy()
            t = probe.targets.numpy()
            hits = 0
            for i in range(n):
                keep = np.arange(n) != i
                w = np.linalg.solve(a[keep].T @ a[keep] + l2 * np.eye(a.shape[1]), a[keep].T @ t[keep])
                hits += int((a[i] @ w).argmax() == y[i])
            assert probe.loo_accuracy(l2) == pytest.approx(hits / n)


def test_constant_features_stay_finite():
    x = np.ones((10, 4))
    x[:, 0] = np.arange(10)
    y = (np.arange(10) >= 5).astype(int)
    pred = ridge_fit_predict(x, y, x, 2, 1.0)
    assert pred.tolist() == y.tolist()


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.zeros((3, 2)), np.array([0, 1]), 2), "x \\(n, d\\) and y"),
        ((np.zeros((2, 2)), np.array([0, 2]), 2), "labels must lie"),
        ((np.full((2, 2), np.nan), np.array([0, 1]), 2), "NaN"),
    ],
)
def test_bad_inputs_raise_one_line(args, match):
    with pytest.raises(ValueError, match=match):
        RidgeProbe(*args)


def test_nonpositive_lambda_rejected():
    with pytest.raises(ValueError, match="l2_reg must be > 0"):
        RidgeProbe(np.eye(3), np.array([0, 1, 2]), 3).weights(0.0)
