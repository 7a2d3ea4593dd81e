"""Few-shot evaluator speed, each figure a ratio against a baseline measured in this same run.

1. Ridge λ sweep: one eigendecomposition reused for every λ (ours) vs a fresh float64 normal-equation solve per λ
   (numpy) and scikit-learn's RidgeClassifier per λ, at CIFAR-like and ImageNet-like few-shot sizes.
2. Embedding: decoding the next batch in a thread while the model embeds (ours) vs decode-then-embed serially.
3. Feature cache: a rerun with more shots (embeds only new train images) vs the same run without a cache.

    OPENBLAS_NUM_THREADS=2 .venv/bin/python benchmarks/fewshot_speed.py --threads 2 [--quick]

Give numpy's BLAS the same thread count as torch (the env var, before start-up): otherwise the numpy baseline
uses every core while torch uses --threads, and the ratios compare thread counts, not methods.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeClassifier

from vitpipe.jobs.evals.features import make_embed_fn
from vitpipe.jobs.evals.fewshot import FeatureCache, FewshotConfig, fewshot_eval
from vitpipe.jobs.evals.ridge import RidgeProbe
from vitpipe.models import create

DATA = Path(os.environ.get("VITPIPE_CIFAR10", Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "cifar10"))
LAMBDAS = (2.0**-2, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_ridge(n: int, d: int, c: int, m: int) -> None:
    """Ours: eigendecomposition shared by the λ sweep, float32 test product (as big_vision); numpy: float64
    normal equations refit per λ. Also one λ alone: Cholesky (ours) vs numpy solve."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, c, n)
    x_test = rng.normal(size=(m, d)).astype(np.float32)

    def ours():
        probe = RidgeProbe(x, y, c).use_eig()
        return [probe.predict(x_test, lam) for lam in LAMBDAS]

    def numpy_refit():
        mean, std = x.mean(0), x.std(0) + 1e-5
        a = np.hstack([(x - mean) / std, np.full((n, 1), 100.0)]).astype(np.float64)
        at = np.hstack([(x_test - mean) / std, np.full((m, 1), 100.0)]).astype(np.float64)
        t = 2.0 * np.eye(c)[y] - 1.0
        out = []
        for lam in LAMBDAS:
            w = np.linalg.solve(a.T @ a + lam * np.eye(d + 1), a.T @ t)
            out.append((at @ w).argmax(1))
        return out

    def sklearn_refit():
        mean, std = x.mean(0), x.std(0) + 1e-5
        a, at = (x - mean) / std, (x_test - mean) / std
        return [RidgeClassifier(alpha=lam).fit(a, y).predict(at) for lam in LAMBDAS]

    def ours_one():
        return RidgeProbe(x, y, c).predict(x_test, 1024.0)

    def numpy_one():
        mean, std = x.mean(0), x.std(0) + 1e-5
        a = np.hstack([(x - mean) / std, np.full((n, 1), 100.0)]).astype(np.float64)
        at = np.hstack([(x_test - mean) / std, np.full((m, 1), 100.0)]).astype(np.float64)
        w = np.linalg.solve(a.T @ a + 1024.0 * np.eye(d + 1), a.T @ (2.0 * np.eye(c)[y] - 1.0))
        return (at @ w).argmax(1)

    t1_ours, t1_np = best_of(ours_one), best_of(numpy_one)
    same = np.mean([np.mean(p == q) for p, q in zip(ours(), numpy_refit())])
    t_ours, t_np, t_sk = best_of(ours), best_of(numpy_refit), best_of(sklearn_refit)
    print(f"  n={n:>6} d={d:>4} C={c:>4} test={m:>6}: ours {t_ours * 1e3:8.1f} ms | numpy refit {t_np * 1e3:8.1f} ms "
          f"({t_np / t_ours:5.2f}x ours) | sklearn RidgeClassifier {t_sk * 1e3:8.1f} ms ({t_sk / t_ours:5.2f}x ours) | "
          f"predictions equal to numpy: {100 * same:.2f}%")
    print(f"  {'':>38}  single λ: ours {t1_ours * 1e3:8.1f} ms | numpy {t1_np * 1e3:8.1f} ms ({t1_np / t1_ours:5.2f}x ours)")


def bench_embed(task, n: int) -> None:
    from vitpipe.pipeline import ImageTransform

    torch.manual_seed(0)
    model = create("Ti/4", img_size=32, num_classes=0).eval()
    idx = np.arange(n)
    bs = 128
    tf = ImageTransform(img_size=32, train=False)

    class LoadOnly:  # the generic path: task.load + per-image transform
        name, load = task.name, task.load

    variants = {
        "batched uint8, no prefetch": make_embed_fn(model, task, tf, batch_size=bs, prefetch=0),
        "batched uint8, prefetch 1": make_embed_fn(model, task, tf, batch_size=bs, prefetch=1),
        "per-image transform, prefetch 1": make_embed_fn(model, LoadOnly(), tf, batch_size=bs, prefetch=1),
    }
    best = {k: float("inf") for k in variants}
    for _ in range(3):  # interleaved rounds, so load from other processes hits every variant alike
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn("test", idx)
            best[k] = min(best[k], time.perf_counter() - t0)
    base = best["batched uint8, no prefetch"]
    for k, t in best.items():
        print(f"  Ti/4@32 pre-logits, {n} CIFAR-10 JPEGs, batch {bs}, {k:32s}: {n / t:7.1f} img/s ({base / t:4.2f}x)")


def bench_cache(task, test_n: int) -> None:
    torch.manual_seed(0)
    model = create("Ti/4", img_size=32, num_classes=0)
    embed = make_embed_fn(model, task, img_size=32, batch_size=128)
    base = FewshotConfig(shots=(1, 5, 10), test_limit=test_n)
    more = FewshotConfig(shots=(1, 5, 10, 25), test_limit=test_n)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(tmp)
        t0 = time.perf_counter()
        fewshot_eval(embed, task, base, cache, model_key="bench", resolution=32)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        fewshot_eval(embed, task, more, cache, model_key="bench", resolution=32)
        t_rerun = time.perf_counter() - t0
    t_uncached = best_of(lambda: fewshot_eval(embed, task, more), 1)
    print(f"  shots 1/5/10 then +25, {test_n} test images: first run {t_first:6.2f} s | rerun +25-shot with cache "
          f"{t_rerun:6.2f} s vs {t_uncached:6.2f} s without ({t_uncached / t_rerun:5.1f}x faster)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}")
    print(f"1. ridge, {len(LAMBDAS)}-point λ sweep (fit + predict), best of 3")
    bench_ridge(n=250, d=192, c=10, m=10_000)                      # CIFAR-10 25-shot, Ti features
    bench_ridge(n=250, d=768, c=10, m=10_000)                      # CIFAR-10 25-shot, B features (dual case)
    if not args.quick:
        bench_ridge(n=10_000, d=768, c=1000, m=10_000)             # ImageNet 10-shot, B features
    if not DATA.is_dir():
        print(f"CIFAR-10 not found at {DATA}: skipping embedding and cache benchmarks")
        return
    from vitpipe.pipeline import ImageFolderTask

    task = ImageFolderTask(str(DATA))
    print("2. embedding throughput")
    bench_embed(task, n=1024 if not args.quick else 512)
    print("3. feature cache")
    bench_cache(task, test_n=2000 if not args.quick else 500)


if __name__ == "__main__":
    main()
