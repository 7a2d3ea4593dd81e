"""Training-step throughput of vitpipe's ViT vs HF transformers ViTForImageClassification (same config, batch).

One step = forward + cross-entropy + backward + AdamW. Both models run in this process, interleaved
round by round so that background load hits them alike; figures are the median round. Utilisation is
``train_flops/img × img/s`` (analytic, ``vitpipe.models.flops``) over the peak: on CPU a 4096² fp32 matmul
timed in this run, on CUDA ``--peak-tflops`` (H100 dense bf16: 989).

    python benchmarks/model_speed.py                                   # CPU fp32: Ti/4@32 b64, B/16@224 b4 and b8
    python benchmarks/model_speed.py --compile                         # adds torch.compile rows
    python benchmarks/model_speed.py --device cuda --dtype bf16 --compile   # B/16 and H/14 on one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import time
from dataclasses import dataclass

import torch

from vitpipe.models import ViTConfig, create, flops


@dataclass
class Case:
    name: str
    img: int
    batch: int

    @classmethod
    def parse(cls, s: str) -> Case:
        """``"B/16@224:4"`` → variant, image size, batch."""
        name, rest = s.split("@")
        img, batch = rest.split(":")
        return cls(name, int(img), int(batch))


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    return f"{model} ({torch.get_num_threads()} threads)"


def keep_freed_memory() -> bool:
    """Tell glibc malloc to keep freed blocks (no trim, no per-block mmap) so each step reuses faulted pages.

    Without it every large activation is a fresh mmap whose first write page-faults: on a 2-core
    machine that cost 40-50 % of a B/16 training step (profiled). Same effect as
    ``MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=1073741824`` in the environment, or jemalloc/tcmalloc.
    Applies to both models alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class MatmulPeak:
    """Best 4096² matmul (fp32 on CPU) seen in this process; re-timed every round so a busy spell at start-up
    cannot lower the peak (and inflate utilisation)."""

    def __init__(self, device: str, dtype: torch.dtype) -> None:
        n = self.n = 4096
        self.device = device
        self.a, self.b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        self.a @ self.b
        self.best = float("inf")
        self.sample(3 if device == "cpu" else 20)

    def sample(self, reps: int = 1) -> None:
        for _ in range(reps):
            sync(self.device)
            t = time.perf_counter()
            self.a @ self.b
            sync(self.device)
            self.best = min(self.best, time.perf_counter() - t)

    @property
    def tflops(self) -> float:
        return 2 * self.n**3 / self.best / 1e12


def hf_model(cfg: ViTConfig, transformers):
    hc = transformers.ViTConfig(
        hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_dim, image_size=cfg.img_size, patch_size=cfg.patch_size,
        num_labels=cfg.num_classes, hidden_act="gelu" if cfg.gelu == "exact" else "gelu_pytorch_tanh",
        layer_norm_eps=cfg.layernorm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",  # HF's fastest path (the default already; explicit for clarity)
    )  # fmt: skip
    model = transformers.ViTForImageClassification(hc)
    forward = lambda x: model(pixel_values=x).logits  # noqa: E731
    return model, forward


class Runner:
    """One model + AdamW + fixed batch; ``steps(n)`` returns seconds for n training steps."""

    def __init__(self, model, forward, case: Case, args, compile_: bool) -> None:
        self.model = model.to(args.device).train()
        self.forward = torch.compile(forward, mode=args.compile_mode) if compile_ else forward
        # Same optimizer for both models: fused AdamW (one kernel per step, available on CPU and CUDA).
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(case.batch, 3, case.img, case.img, generator=g).to(args.device)
        self.y = torch.randint(0, 1000, (case.batch,), generator=g).to(args.device)
        self.device = args.device
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
        )

    def step(self) -> None:
        with self.autocast:
            loss = torch.nn.functional.cross_entropy(self.forward(self.x).float(), self.y)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def steps(self, n: int) -> float:
        sync(self.device)
        t = time.perf_counter()
        for _ in range(n):
            self.step()
        sync(self.device)
        return time.perf_counter() - t


def bench_case(case: Case, args, transformers, peak: MatmulPeak | None) -> dict[tuple[str, bool], list[float]]:
    """Seconds per step of each (model, compiled) variant, one entry per interleaved round."""
    cfg = ViTConfig.from_name(case.name, img_size=case.img, num_classes=1000, gelu="exact")
    variants: list[tuple[str, bool]] = [("hf", False), ("vitpipe", False)]
    if args.compile:
        variants += ([] if args.no_hf_compile else [("hf", True)]) + [("vitpipe", True)]
    runners = {}
    for kind, comp in variants:
        torch.manual_seed(0)
        if kind == "hf":
            model, fwd = hf_model(cfg, transformers)
        else:
            model = create(cfg)
            fwd = model
        r = Runner(model, fwd, case, args, comp)
        t = time.perf_counter()
        for _ in range(args.warmup):
            r.step()
        sync(args.device)
        runners[(kind, comp)] = r
        label = f"{kind}{' +compile' if comp else ''}"
        dt = time.perf_counter() - t
        print(f"  {case.name}@{case.img} b{case.batch}: built {label} (warm-up {dt:.1f}s)", flush=True)
    times: dict[tuple[str, bool], list[float]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for k, r in runners.items():  # interleaved: background load affects every model alike
            times[k].append(r.steps(args.steps) / args.steps)
        if peak is not None:
            peak.sample()
    del runners
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return times


def report(case: Case, times: dict[tuple[str, bool], list[float]], peak_tflops: float) -> None:
    """One line per variant: median img/s, utilisation, and the median (min-max) of per-round speed ratios."""
    train_flops = flops(ViTConfig.from_name(case.name, img_size=case.img, num_classes=1000))["train_flops"]

    def ratio(num: list[float], den: list[float]) -> str:
        # Paired by round (both ran back to back), so a slow spell shifts the pair, not the ratio.
        rs = sorted(d / n for n, d in zip(num, den))
        return f"{statistics.median(rs):.2f}x ({rs[0]:.2f}-{rs[-1]:.2f})"

    name = f"{case.name}@{case.img} b{case.batch}"
    for (kind, comp), ts in times.items():
        ips = case.batch / statistics.median(ts)
        util = ips * train_flops / 1e12 / peak_tflops
        same = times.get(("hf", comp))
        label = kind + (" +compile" if comp else "")
        print(f"{name:<20} {label:<18} {ips:>9.{1 if ips >= 10 else 2}f} {100 * util:>9.1f}% "
              f"{ratio(ts, times[('hf', False)]):>18} {ratio(ts, same) if same else '-':>18}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--no-hf-compile", action="store_true", help="with --compile: skip compiling HF (slow)")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--cases", nargs="*", help="'<variant>@<img>:<batch>', e.g. Ti/4@32:64")
    ap.add_argument("--steps", type=int, default=None, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per model (median reported)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--default-malloc", action="store_true", help="CPU: keep glibc's default trim/mmap thresholds")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="CUDA peak for MFU (H100 dense bf16: 989)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    if args.dtype == "bf16" and not cuda:
        raise SystemExit("--dtype bf16 is for CUDA; CPU figures are fp32")
    cases = args.cases or (["B/16@224:256", "H/14@224:64"] if cuda else ["Ti/4@32:64", "B/16@224:4", "B/16@224:8"])
    args.steps = args.steps or (10 if cuda else 2)
    args.rounds = args.rounds or (5 if cuda else 7)
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    import transformers  # test extra; imported late so --help works without it

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        measured = MatmulPeak("cuda", torch.bfloat16).tflops
        print(f"device: {device_name('cuda')}; bf16 4096² matmul {measured:.0f} TFLOP/s; "
              f"MFU vs {args.peak_tflops:.0f} TFLOP/s")  # fmt: skip
        peak = None
    else:
        tuned = not args.default_malloc and keep_freed_memory()
        peak = MatmulPeak("cpu", torch.float32)
        print(f"device: {device_name('cpu')}; malloc {'keeps freed memory (mallopt)' if tuned else 'default'}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, dtype {args.dtype}")
    print("ratios: median over rounds of the per-round speed ratio (min-max); img/s: median round")
    for c in cases:
        case = Case.parse(c)
        times = bench_case(case, args, transformers, peak)
        if peak is not None:
            print(f"fp32 4096² matmul peak so far: {peak.tflops * 1e3:.0f} GFLOP/s")
        util = "MFU" if cuda else "% of peak"
        print(f"{'case':<20} {'model':<18} {'img/s':>9} {util:>10} {'vs HF eager':>18} {'vs HF same mode':>18}")
        report(case, times, peak.tflops if peak is not None else args.peak_tflops)  # per case: a run cut short


if __name__ == "__main__":
    main()
