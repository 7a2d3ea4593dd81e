"""Closed-form ridge-regression linear probe, as in big_vision's few-shot evaluator (paper §4.1 "Metrics").

Procedure (big_vision `evaluators/fewshot_lsr.py`): standardise the features with the few-shot sample's own mean
and standard deviation, append a constant bias feature, regress targets ``2 * onehot - 1`` with L2-regularised least
squares in closed form, and predict the argmax of the test scores.

The solve goes through one eigendecomposition of the Gram matrix (``X^T X`` when n >= d, ``X X^T`` otherwise), so
every extra λ of a sweep, and the leave-one-out estimate used to pick λ without touching the test split, costs a
matrix product instead of a new factorisation. Everything is float64 (torch.linalg) for stability.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["BIAS_CONSTANT", "STD_EPS", "RidgeProbe", "ridge_fit_predict"]

# big_vision appends 100, not 1: the bias column is penalised like every other weight, but a large constant makes
# the penalty on the effective bias negligible (weight w_b contributes 100 * w_b, its penalty is only w_b**2).
BIAS_CONSTANT = 100.0
# Added to the sample std (big_vision: 1e-5) so constant features (e.g. dead units, 1-shot samples) stay finite.
STD_EPS = 1e-5


def _as_f64(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device="cpu", dtype=torch.float64)
    return torch.as_tensor(np.asarray(a), dtype=torch.float64)


class RidgeProbe:
    """Ridge probe fitted on one few-shot sample; predicts for any λ > 0 from one cached eigendecomposition.

    ``x`` is (n, d) features, ``y`` is (n,) integer labels in ``[0, num_classes)``.
    """

    def __init__(
        self,
        x: np.ndarray | torch.Tensor,
        y: np.ndarray | torch.Tensor,
        num_classes: int,
        *,
        bias_constant: float = BIAS_CONSTANT,
    ) -> None:
        x64 = _as_f64(x)
        y_np = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y).astype(np.int64)
        if x64.ndim != 2 or y_np.ndim != 1 or x64.shape[0] != y_np.shape[0]:
            raise ValueError(f"ridge probe needs x (n, d) and y (n,), got x {tuple(x64.shape)} and y {y_np.shape}")
        if x64.shape[0] == 0:
            raise ValueError("ridge probe needs at least one training example")
        if y_np.min() < 0 or y_np.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), got range [{y_np.min()}, {y_np.max()}]")
        if not torch.isfinite(x64).all():
            raise ValueError("ridge probe features contain NaN or inf")
        self.num_classes = int(num_classes)
        self.bias_constant = float(bias_constant)
        self.labels = torch.as_tensor(y_np)
        # Population std (ddof=0), as big_vision's jnp.std.
        self.mean = x64.mean(dim=0, keepdim=True)
        self.std = x64.std(dim=0, unbiased=False, keepdim=True) + STD_EPS
        self.x = self._augment(x64)                                        # (n, d+1)
        self.targets = 2.0 * torch.nn.functional.one_hot(self.labels, self.num_classes).to(torch.float64) - 1.0
        n, d = self.x.shape
        # (A) n >= d: W = (X^T X + λI)^-1 X^T Y        (B) n < d: W = X^T (X X^T + λI)^-1 Y
        # The Gram matrix is λ-independent; one λ is a Cholesky solve, many λ (a sweep, leave-one-out) share one
        # eigendecomposition G = q diag(e) q^T, after which W = lhs · diag(1/(e+λ)) · rhs costs a matrix product.
        self.primal = n >= d
        self.gram = self.x.T @ self.x if self.primal else self.x @ self.x.T
        if self.primal:
            # X^T (2·onehot - 1) = 2·(per-class column sums) - (column sums): O(n·d) instead of an O(n·d·C) product,
            # which dominates at ImageNet scale (C = 1000).
            class_sums = torch.zeros(d, self.num_classes, dtype=torch.float64).index_add_(1, self.labels, self.x.T)
            self._rhs_direct = 2.0 * class_sums - self.x.sum(dim=0)[:, None]
        else:
            self._rhs_direct = self.targets
        self._eig: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def use_eig(self) -> RidgeProbe:
        """Factorise the Gram matrix once (eigh) so later λ values cost no new factorisation; returns self."""
        if self._eig is None:
            eigs, q = torch.linalg.eigh(self.gram)
            lhs, rhs = (q, q.T @ self._rhs_direct) if self.primal else (self.x.T @ q, q.T @ self.targets)
            self._eig = (eigs, q, lhs, rhs)
        return self

    def _augment(self, x64: torch.Tensor) -> torch.Tensor:
        z = (x64 - self.mean) / self.std
        return torch.nn.functional.pad(z, (0, 1), value=self.bias_constant)

    def weights(self, l2_reg: float) -> torch.Tensor:
        """(d+1, num_classes) float64 weights for regulariser ``l2_reg``; the last row multiplies the bias feature."""
        if not l2_reg > 0:
            raise ValueError(f"l2_reg must be > 0, got {l2_reg}")
        if self._eig is not None:
            eigs, _, lhs, rhs = self._eig
            return (lhs / (eigs + l2_reg)) @ rhs
        eye = torch.eye(self.gram.shape[0], dtype=self.gram.dtype)
        chol = torch.linalg.cholesky(self.gram + l2_reg * eye)
        sol = torch.cholesky_solve(self._rhs_direct, chol)
        return sol if self.primal else self.x.T @ sol

    def _folded(self, l2_reg: float) -> tuple[torch.Tensor, torch.Tensor]:
        # Fold standardisation and the bias feature into (d, C) weights and a (C,) offset, so test features are
        # used as given: z @ W = x @ (W[:d] / std^T) + (bias * W[d] - (mean / std) @ W[:d]). Saves an (m, d)
        # float64 copy of the test split per probe and per λ.
        w = self.weights(l2_reg)
        w_x = w[:-1] / self.std.T
        return w_x, self.bias_constant * w[-1] - self.mean @ w_x

    def scores(self, x_test: np.ndarray | torch.Tensor, l2_reg: float,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(m, num_classes) regression scores of test features (standardised with the sample's statistics).

        The weights are always solved in float64; ``dtype`` is the precision of the (m, d) x (d, C) test product.
        """
        if x_test.ndim != 2 or x_test.shape[1] != self.mean.shape[1]:
            raise ValueError(f"test features must be (m, {self.mean.shape[1]}), got {tuple(x_test.shape)}")
        x = torch.as_tensor(np.asarray(x_test) if not isinstance(x_test, torch.Tensor) else x_test.detach().cpu())
        w_x, b = self._folded(l2_reg)
        return x.to(dtype) @ w_x.to(dtype) + b.to(dtype)

    def predict(self, x_test: np.ndarray | torch.Tensor, l2_reg: float) -> np.ndarray:
        """(m,) int64 predicted classes. The test product runs in float32, as big_vision's evaluator does (the
        solve stays float64): on a 10k x 768 x 1000-class split that halves the dominant cost."""
        return self.scores(x_test, l2_reg, dtype=torch.float32).argmax(dim=1).numpy()

    def accuracy(self, x_test: np.ndarray | torch.Tensor, y_test: np.ndarray, l2_reg: float) -> float:
        """Fraction of test examples whose predicted class equals ``y_test``."""
        return float(np.mean(self.predict(x_test, l2_reg) == np.asarray(y_test)))

    def loo_accuracy(self, l2_reg: float) -> float:
        """Leave-one-out accuracy on the few-shot sample itself, in closed form (no refits).

        Uses the ridge identity ŷ_(-i) = (ŷ_i - H_ii y_i) / (1 - H_ii) with the hat matrix H = X (X^T X + λI)^-1 X^T.
        The standardisation statistics are kept from the full sample (the usual shortcut, as in GCV); this picks λ
        from training data only, unlike choosing it on the test split.
        """
        if not l2_reg > 0:
            raise ValueError(f"l2_reg must be > 0, got {l2_reg}")
        eigs, q, _, _ = self.use_eig()._eig  # type: ignore[misc]
        if self.primal:
            z = self.x @ q                                                  # (n, d)
            h = (z * z / (eigs + l2_reg)).sum(dim=1)
        else:
            h = (q * q * (eigs / (eigs + l2_reg))).sum(dim=1)
        fitted = self.x @ self.weights(l2_reg)
        loo = (fitted - h[:, None] * self.targets) / (1.0 - h[:, None]).clamp_min(1e-12)
        return float((loo.argmax(dim=1) == self.labels).double().mean())


def ridge_fit_predict(
    x_train: np.ndarray | torch.Tensor,
    y_train: np.ndarray | torch.Tensor,
    x_test: np.ndarray | torch.Tensor,
    num_classes: int,
    l2_reg: float = 1024.0,
    *,
    bias_constant: float = BIAS_CONSTANT,
) -> np.ndarray:
    """Fit the big_vision ridge probe on (x_train, y_train) and return (m,) predicted classes for x_test."""
    return RidgeProbe(x_train, y_train, num_classes, bias_constant=bias_constant).predict(x_test, l2_reg)
