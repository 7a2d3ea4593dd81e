"""Full-data linear probe on frozen features: multinomial logistic regression on all training features.

Features are standardised with the fitting set's mean and population std (a constant feature keeps scale 1, as
scikit-learn's ``StandardScaler``). The objective is the mean softmax cross-entropy plus ``(λ / 2) ||W||²``; the
bias is not penalised. That is scikit-learn's ``LogisticRegression(C=1 / (λ n))`` objective, solved the same way
(full-batch L-BFGS through SciPy, stopping on the largest gradient component); loss and gradient are closed-form
torch products.

Selection protocol (paper appendix B.1.1): λ is chosen from ``cfg.l2_grid`` by accuracy on a stratified, seeded
held-out slice of train (10% of small sets, 2% of large ones), then the probe is refitted on all of train with that
λ and scored once on test. Test accuracy never takes part in the choice.

Cost is bounded: ``len(l2_grid) + 1`` fits, each at most ``max_iter`` L-BFGS iterations and ``3 * max_iter`` loss
evaluations (usually about one per iteration); one evaluation is two (n, d) x (d, C) products. For 50k x 384
features and 10 classes that is ~0.8 GFLOP per evaluation, so the default grid stays under 7 * 3000 * 0.8 GFLOP
even if no fit converges early. Memory: the (n, d) standardised features in ``dtype`` plus a few (n, C)
arrays. The grid runs from the largest λ down, each fit warm-started from the previous solution.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vitpipe.pipeline.fields import runtime_field

from .features import REPRESENTATIONS, EmbedFn, FeatureCache, bind_cache
from .fewshot import FewshotTask, _l2_name
from .knn import subset

__all__ = ["LinearProbeConfig", "LogisticProbe", "fit_logistic", "linear_eval", "linear_metrics"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(kw_only=True)
class LinearProbeConfig:
    """Full-data logistic-regression probe settings."""

    l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    """Candidate λ (penalty (λ/2)·||W||² on the mean loss; scikit-learn's C = 1 / (λ n)); one value: no choice."""
    holdout_fraction: float | None = None
    """Share of train held out to choose λ; None: the paper's rule (2% at >= 20,000 images, else 10%)."""
    seed: int = 0
    """Seed of the held-out slice (stratified) and of the train limit (the test subset is the few-shot probe's)."""
    max_iter: int = 1000
    """L-BFGS iteration cap per fit."""
    tol: float = 1e-6
    """Stop when the largest absolute gradient component is at most this (scikit-learn's ``tol`` for lbfgs)."""
    dtype: str = "float64"
    """Precision of the fit: ``float64`` (default; agrees with scikit-learn to ~1e-6) or ``float32`` (half the
    memory and time; its gradients bottom out near 1e-5, so pair it with ``tol`` >= 1e-5)."""
    representation: str = "pre_logits"
    """Which frozen features: ``pre_logits``, ``token`` or ``gap``."""
    train_limit: int | None = None
    """Fit on a fixed random subset of this many training images (smoke runs); None = all of train."""
    test_limit: int | None = None
    """Score on a fixed random subset of this many test images; None = the full test split."""
    batch_size: int = runtime_field(256)
    """Images per forward pass when embedding (for the stage's ``make_embed_fn``)."""

    def __post_init__(self) -> None:
        self.l2_grid = tuple(float(v) for v in self.l2_grid)
        if not self.l2_grid or min(self.l2_grid) <= 0 or not all(map(math.isfinite, self.l2_grid)):
            raise ValueError(f"LinearProbeConfig.l2_grid must be positive numbers, got {self.l2_grid}")
        if len(set(self.l2_grid)) != len(self.l2_grid):
            raise ValueError(f"LinearProbeConfig.l2_grid must be distinct, got {self.l2_grid}")
        if self.holdout_fraction is not None and not 0 < self.holdout_fraction < 1:
            raise ValueError(f"LinearProbeConfig.holdout_fraction must be in (0, 1) or None, "
                             f"got {self.holdout_fraction}")
        if self.max_iter < 1:
            raise ValueError(f"LinearProbeConfig.max_iter must be >= 1, got {self.max_iter}")
        if not self.tol > 0:
            raise ValueError(f"LinearProbeConfig.tol must be > 0, got {self.tol}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"LinearProbeConfig.dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"LinearProbeConfig.representation must be one of {REPRESENTATIONS}, "
                             f"got {self.representation!r}")
        for f in ("train_limit", "test_limit"):
            if getattr(self, f) is not None and getattr(self, f) < 2:
                raise ValueError(f"LinearProbeConfig.{f} must be >= 2 or None, got {getattr(self, f)}")
        if self.batch_size < 1:
            raise ValueError(f"LinearProbeConfig.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class LogisticProbe:
    """A fitted probe: ``logits = ((x - mean) / scale) @ weight + bias``."""

    weight: torch.Tensor
    """(d, C) weights on standardised features."""
    bias: torch.Tensor
    """(C,) unpenalised biases (they sum to ~0: L-BFGS from zero keeps them on that subspace)."""
    mean: torch.Tensor
    """(d,) feature means of the fitting set."""
    scale: torch.Tensor
    """(d,) population std of the fitting set (1 for constant features)."""
    l2: float
    """λ of the fit."""
    n_iter: int
    """L-BFGS iterations used."""
    grad_max: float
    """Largest absolute gradient component at the end (<= tol when converged)."""

    def logits(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(m, C) logits of raw (unstandardised) features; standardisation is folded into the weights so no
        standardised copy of ``x`` is made."""
        x = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=self.weight.dtype)
        w = self.weight / self.scale[:, None]
        return x @ w + (self.bias - self.mean @ w)

    def predict(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(m,) int64 predicted classes."""
        return self.logits(x).argmax(dim=1).numpy()

    def predict_proba(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """(m, C) softmax probabilities."""
        return torch.softmax(self.logits(x), dim=1).numpy()


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=0)
    scale = x.std(dim=0, unbiased=False)
    # StandardScaler's rule: a (numerically) constant feature is left unscaled instead of blown up.
    return mean, torch.where(scale < 10 * torch.finfo(x.dtype).eps, torch.ones_like(scale), scale)


def fit_logistic(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray,
    num_classes: int,
    l2: float,
    *,
    max_iter: int = 1000,
    tol: float = 1e-6,
    dtype: torch.dtype = torch.float64,
    init: LogisticProbe | None = None,
) -> LogisticProbe:
    """Fit ``min mean CE(z W + b, y) + (l2 / 2) ||W||²`` on standardised ``z`` with full-batch L-BFGS, from zero
    or warm-started from ``init``'s weights.

    The optimiser is SciPy's L-BFGS-B with scikit-learn's settings for this solver (``gtol=tol``, ``maxls=50``,
    ``ftol=64 eps``) plus a cap of ``3 * max_iter`` loss evaluations; loss and gradient are computed in closed
    form in torch (``dtype``), so one evaluation is one forward and one gradient product, no autograd graph.
    """
    from scipy.optimize import minimize
    from threadpoolctl import threadpool_limits  # scikit-learn's dependency, as is SciPy

    if not l2 > 0:
        raise ValueError(f"l2 must be > 0, got {l2}")
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(dtype)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.int64)
    if xt.ndim != 2 or yt.shape != (xt.shape[0],) or xt.shape[0] == 0:
        raise ValueError(f"logistic probe needs x (n, d) and y (n,), got {tuple(xt.shape)} and {tuple(yt.shape)}")
    if yt.min() < 0 or yt.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(yt.min())}, {int(yt.max())}]")
    if not torch.isfinite(xt).all():
        raise ValueError("logistic probe features contain NaN or inf")
    mean, scale = _standardizer(xt)
    z = (xt - mean) / scale
    del xt
    (n, d), c = z.shape, num_classes
    rows = torch.arange(n)

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w = torch.from_numpy(theta[: d * c].reshape(d, c)).to(dtype)
        b = torch.from_numpy(theta[d * c :]).to(dtype)
        logits = z @ w + b
        lse = torch.logsumexp(logits, dim=1)
        loss = float((lse - logits[rows, yt]).mean()) + 0.5 * l2 * float((w * w).sum())
        resid = torch.exp(logits - lse[:, None])          # softmax, then minus one-hot, over n: dL/dlogits
        resid[rows, yt] -= 1.0
        resid /= n
        grad = torch.cat([(z.T @ resid + l2 * w).reshape(-1), resid.sum(dim=0)])
        return loss, grad.to(torch.float64).numpy()

    theta0 = np.zeros(d * c + c) if init is None else np.concatenate(
        [init.weight.to(torch.float64).reshape(-1).numpy(), init.bias.to(torch.float64).numpy()])
    # L-BFGS-B's own work is O(d C) vector updates: threads cannot help it, and SciPy's OpenBLAS threads spinning
    # against torch's OpenMP threads made small fits many times slower on 2 cores. Torch's MKL is not affected.
    with threadpool_limits(limits=1, user_api="blas"):
        res = minimize(loss_grad, theta0, method="L-BFGS-B", jac=True,
                       options={"maxiter": max_iter, "maxfun": 3 * max_iter, "maxls": 50, "gtol": tol,
                                "ftol": 64 * np.finfo(float).eps})
    grad_max = float(np.abs(res.jac).max())
    if not res.success:  # e.g. the iteration cap (scikit-learn warns in the same case)
        # at the cap with a tiny gradient the fit is as good as converged (weak L2 takes many iterations): the log
        # has it; a material gradient left is a warning
        report = log.warning if grad_max > 1e-3 else log.info
        report("logistic probe (l2=%g) did not converge in %d iterations: max |grad| %.2e (%s)",
               l2, res.nit, grad_max, res.message)
    theta = torch.from_numpy(res.x).to(dtype)
    return LogisticProbe(weight=theta[: d * c].reshape(d, c), bias=theta[d * c :], mean=mean, scale=scale,
                         l2=float(l2), n_iter=int(res.nit), grad_max=grad_max)


def linear_metrics(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: LinearProbeConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> Iterator[tuple[str, float]]:
    """Yield, with a grid of two or more λ: ``<task>/linear/l2_<λ>/val_acc`` per grid value,
    ``<task>/linear/val_acc`` (held-out accuracy of the chosen λ) and ``<task>/linear/holdout_size``; always
    ``<task>/linear/l2`` (the chosen λ) and ``<task>/linear/test_acc`` (refit on all of train, scored on test)."""
    embed_fn = bind_cache(embed_fn, cache, evaluator="linear_eval", model_key=model_key, task=task.name,
                          resolution=resolution, representation=cfg.representation)
    from vitpipe.pipeline.tasks import holdout_fraction, stratified_holdout

    num_classes, dtype = len(task.classes), _DTYPES[cfg.dtype]
    train_labels = np.asarray(task.train_labels, dtype=np.int64)
    test_labels = np.asarray(task.test_labels, dtype=np.int64)
    train_idx = subset(train_labels.size, cfg.train_limit, cfg.seed)
    # the few-shot probe's fixed test subset (seed 0, whatever cfg.seed): one embedding serves every evaluator
    test_idx = subset(test_labels.size, cfg.test_limit, 0)
    x_train = np.asarray(embed_fn("train", train_idx))
    y_train = train_labels[train_idx]
    fit_kw = {"max_iter": cfg.max_iter, "tol": cfg.tol, "dtype": dtype}

    best, val_acc, n_held, warm = cfg.l2_grid[0], float("nan"), 0, None
    if len(cfg.l2_grid) > 1:
        frac = cfg.holdout_fraction or holdout_fraction(train_idx.size)
        fit_pos, held_pos = stratified_holdout(y_train, frac, cfg.seed)
        n_held = held_pos.size
        x_fit, x_held = x_train[fit_pos], x_train[held_pos]
        accs: dict[float, float] = {}
        for l2 in sorted(cfg.l2_grid, reverse=True):   # strongest first: each fit warm-starts the next
            warm = fit_logistic(x_fit, y_train[fit_pos], num_classes, l2, init=warm, **fit_kw)
            accs[l2] = float(np.mean(warm.predict(x_held) == y_train[held_pos]))
        del x_fit
        for l2 in cfg.l2_grid:
            yield f"{task.name}/linear/{_l2_name(l2)}/val_acc", accs[l2]
        # Ties go to the larger λ (the more regularised probe), as in the few-shot λ choice.
        best = max(sorted(cfg.l2_grid, reverse=True), key=lambda v: accs[v])
        val_acc = accs[best]
    # The refit standardises with all-train statistics: it starts from zero, like any single fit.
    probe = fit_logistic(x_train, y_train, num_classes, best, **fit_kw)
    test_acc = float(np.mean(probe.predict(np.asarray(embed_fn("test", test_idx))) == test_labels[test_idx]))
    log.info("linear %s: l2=%g val %.4f test %.4f (%d iterations)", task.name, best, val_acc, test_acc, probe.n_iter)
    if n_held:
        yield f"{task.name}/linear/val_acc", val_acc
        yield f"{task.name}/linear/holdout_size", float(n_held)
    yield f"{task.name}/linear/l2", best
    yield f"{task.name}/linear/test_acc", test_acc


def linear_eval(
    embed_fn: EmbedFn,
    task: FewshotTask,
    cfg: LinearProbeConfig,
    cache: FeatureCache | None = None,
    *,
    model_key: str | None = None,
    resolution: int | str | None = None,
) -> dict[str, float]:
    """All of :func:`linear_metrics` as an insertion-ordered dict."""
    return dict(linear_metrics(embed_fn, task, cfg, cache, model_key=model_key, resolution=resolution))
