"""Few-shot evaluator speed, each figure a ratio against a baseline measured in this same run.

1. Ridge λ sweep: one eigendecomposition reused for every λ (ours) vs a fresh float64 normal-equation solve per λ
   (numpy) and scikit-learn's RidgeClassifier per λ, at CIFAR-like and ImageNet-like few-shot sizes.
2. Embedding: decoding the next batch in a thread while the model embeds (ours) vs decode-then-embed serially.
3. Feature cache: a rerun with more shots (embeds only new train images) vs the same run without a cache.
4. In-training evaluation (the demo recipe's ``pretrain.evals``): seconds per evaluation on rank 0 against the
   demo's training step (forward + backward + AdamW of one rank's micro-batch on its thread), as the share of
   training time that evaluation stalls the workers at the demo's ``every``.

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


def bench_in_training(recipe: str = "demo", rounds: int = 2, overrides: tuple[str, ...] = ()) -> None:
    """The in-training evaluation's cost (jobs/train/evaluation.py, the code the callback runs) vs one training step
    of the same model, both measured here, now: the share is ``eval_s / (every * step_s)``."""
    import types

    from vitpipe.jobs.config import build_config
    from vitpipe.jobs.train.evaluation import InTrainingEval, prepare_evals

    cfg = build_config(recipe, list(overrides))
    p, mcfg = cfg.pretrain, cfg.model
    ev = prepare_evals(p.evals)
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    vit = create(mcfg)
    # one rank's step: its micro-batches (global / (micro * workers)) through forward, backward and AdamW on its
    # worker's threads (demo: 2 workers of 1 thread on 2 cores)
    accum = max(1, p.global_batch // (p.micro_batch * p.num_workers))
    opt = torch.optim.AdamW(vit.parameters(), lr=1e-4)
    x = torch.randn(p.micro_batch, 3, *mcfg.img_hw)
    y = torch.randint(0, mcfg.num_classes, (p.micro_batch,))

    def step():
        for _ in range(accum):
            torch.nn.functional.cross_entropy(vit(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed_step() -> float:
        torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
        try:
            return best_of(step, 3)
        finally:
            torch.set_num_threads(threads)

    step()
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: p.zero_stage or 0, module=vit)
    tr = types.SimpleNamespace(rank=0, state=types.SimpleNamespace(step=0), p=p, engine=engine, vit=vit, mcfg=mcfg,
                               device=torch.device("cpu"), tracker=None, mpp=False)
    with tempfile.TemporaryDirectory() as tmp:
        cb = InTrainingEval(ev, tmp, rank=0)
        t0 = time.perf_counter()
        cb.on_train_start(tr)  # decodes the images once (kept), then evaluates step 0
        setup_s = time.perf_counter() - t0 - cb.last_s
        evals, steps = [cb.last_s], [timed_step()]
        for r in range(1, rounds):  # interleaved, so load from other processes hits both alike
            tr.state.step = r * ev.every
            cb.on_step_end(tr)
            evals.append(cb.last_s)
            steps.append(timed_step())
    step_s, eval_s = float(np.median(steps)), float(np.median(evals))
    n_evals = p.steps // ev.every + (p.steps % ev.every > 0)
    shares = [e / (ev.every * t) for e, t in zip(evals, steps)]  # per round: an eval and the steps right after it
    share = float(np.median(shares))
    names = [t.partition("=")[0] for t in ev.tasks]
    print(f"  {recipe}: {len(ev.tasks)} task(s) {names}, {len(ev.shots)} shot counts x {len(ev.seeds)} seeds, up to "
          f"{ev.test_limit} scored images each, {ev.threads or threads} thread(s)")
    print(f"  one evaluation {eval_s:6.2f} s (first decode of its images {setup_s:5.2f} s, once per attempt) | "
          f"training step {step_s * 1e3:7.1f} ms (ViT width {mcfg.width} depth {mcfg.depth}, micro-batch "
          f"{p.micro_batch} x {accum}, {p.threads_per_worker or p.cpus_per_worker} thread(s))")
    print(f"  in-training evaluation share of training step time: {100 * share:.1f}% at every={ev.every} (rounds "
          f"{100 * min(shares):.1f}-{100 * max(shares):.1f}%; {n_evals} evaluations over {p.steps} steps plus step 0; "
          f"bound max_stall={ev.max_stall})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--only-in-training", action="store_true", help="run only part 4 (in-training evaluation)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the demo recipe for part 4, e.g. pretrain.evals.threads=1 (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({torch.get_num_threads()} torch threads), torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}")
    if args.only_in_training:
        print("4. in-training evaluation (demo recipe)")
        bench_in_training(rounds=2 if args.quick else 3, overrides=tuple(args.set))
        return
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
    print("4. in-training evaluation (demo recipe)")
    bench_in_training(rounds=2 if args.quick else 3, overrides=tuple(args.set))


if __name__ == "__main__":
    main()
