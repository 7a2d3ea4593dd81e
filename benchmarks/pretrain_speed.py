"""Pretraining throughput: vitpipe's DeepSpeed step vs a bare PyTorch loop of the same model and batch, same run.

CPU (default): the full pretrain stage (Ray Train, 2 workers x 1 thread, DeepSpeed ZeRO-2, shard streaming) on a
CIFAR-10 slice vs a bare single-process loop (2 threads, AdamW, the same shard stream) -> ratio (target >= 0.9).

GPU (``--device cuda``): single-GPU bf16 throughput and MFU of ViT-B/16 and ViT-H/14 under DeepSpeed ZeRO-1/2/3,
with and without activation checkpointing, vs the bare loop (torch.autocast bf16, fused AdamW); plus the largest
per-GPU micro-batch that fits for H/14 (``--max-batch``).

    python benchmarks/pretrain_speed.py                       # CPU, ~6 min on 2 cores
    python benchmarks/pretrain_speed.py --device cuda --variants B/16,H/14 --max-batch
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from vitpipe.models import create, flops


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _init_dist() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def bare_steps(model, batches, steps: int, device: str, bf16: bool) -> float:
    """Images/s of a plain AdamW loop (fused on CUDA) over ``steps`` timed steps after 3 warm-ups."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    n = 0

    def one(x, y):
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i, (x, y) in enumerate(batches):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        one(x.to(device), y.to(device))
        n += len(x) if i >= 3 else 0
        if i == steps + 2:
            break
    _sync(device)
    return n / (time.perf_counter() - t0)


def deepspeed_steps(model, batches, steps: int, device: str, zero: int, micro: int) -> float:
    import deepspeed

    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.ds_config import deepspeed_config
    from vitpipe.jobs.train.optim import param_groups

    _init_dist()
    p = PretrainConfig(steps=10_000, global_batch=micro, micro_batch=micro, zero_stage=zero, warmup_steps=10)
    cfg = deepspeed_config(p, world_size=1, device=device, num_params=0)
    cfg["optimizer"]["params"]["torch_adam"] = True  # no JIT build of FusedAdam inside a timed benchmark
    engine = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)[0]
    bf16 = cfg["bf16"]["enabled"]
    n = 0
    for i, (x, y) in enumerate(batches):
        if i == 3:
            _sync(device)
            t0 = time.perf_counter()
        x = x.to(device)
        loss = F.cross_entropy(engine(x.to(torch.bfloat16) if bf16 else x).float(), y.to(device))
        engine.backward(loss)
        engine.step()
        n += len(x) if i >= 3 else 0
        if i == steps + 2:
            break
    _sync(device)
    ips = n / (time.perf_counter() - t0)
    engine.destroy()
    return ips


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synthetic(batch: int, img: int, classes: int, device: str):
    x = torch.randn(batch, 3, img, img, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    while True:
        yield x, y


def gpu(args) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    peak = args.peak_tflops * 1e12
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, peak {args.peak_tflops} TFLOP/s bf16")
    rows = []
    for variant in args.variants.split(","):
        batch = {"B/16": 128, "H/14": 32}.get(variant, 64)
        per_img = flops(create(variant, num_classes=1000, img_size=224).cfg)["train_flops"]

        def fresh(ckpt: bool):
            torch.manual_seed(0)
            m = create(variant, num_classes=1000, img_size=224).cuda()
            m.set_grad_checkpointing(ckpt)
            return m

        torch.cuda.reset_peak_memory_stats()
        ips = bare_steps(fresh(False), synthetic(batch, 224, 1000, "cuda"), args.steps, "cuda", True)
        rows.append((variant, "bare autocast-bf16 fused AdamW", batch, ips, ips * per_img / peak,
                     torch.cuda.max_memory_allocated() / 2**30))
        for zero in args.zero_stages:
            for ckpt in (False, True):
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                ips = deepspeed_steps(fresh(ckpt), synthetic(batch, 224, 1000, "cuda"), args.steps, "cuda", zero,
                                      batch)
                rows.append((variant, f"deepspeed ZeRO-{zero}{' +act-ckpt' if ckpt else ''}", batch, ips,
                             ips * per_img / peak, torch.cuda.max_memory_allocated() / 2**30))
                print(*rows[-1], flush=True)
    print(f"\n{'model':6} {'setup':34} {'batch':>5} {'img/s':>8} {'MFU':>6} {'peak GiB':>8}")
    for r in rows:
        print(f"{r[0]:6} {r[1]:34} {r[2]:5d} {r[3]:8.1f} {100 * r[4]:5.1f}% {r[5]:8.1f}")
    if args.max_batch:
        print("\nlargest H/14 micro-batch per GPU (bf16, DeepSpeed ZeRO-3 + activation checkpointing):")
        best, b = None, 64
        while b <= 4096:
            try:
                torch.cuda.empty_cache()
                model = create("H/14", num_classes=1000, img_size=224).cuda()
                model.set_grad_checkpointing(True)
                ips = deepspeed_steps(model, synthetic(b, 224, 1000, "cuda"), 2, "cuda", 3, b)
                best = (b, round(ips, 1))
                print(f"  batch {b}: fits, {ips:.1f} img/s", flush=True)
                b *= 2
            except torch.OutOfMemoryError:
                print(f"  batch {b}: out of memory")
                break
            finally:
                model = None
        print(f"  largest tried that fits: {best}")


def cpu(args) -> None:
    from vitpipe.jobs.cli import stages_for
    from vitpipe.jobs.config import resolve_paths
    from vitpipe.jobs.configtools import apply_overrides
    from vitpipe.jobs.recipes import get_recipe
    from vitpipe.jobs.runner import run_pipeline
    from vitpipe.jobs.tracking import NullTracker
    from vitpipe.pipeline import ShardStream

    from vitpipe.jobs.raytools import MALLOC_ENV

    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        # The Ray workers run with these malloc settings (freed activations stay mapped instead of being re-faulted
        # every step, worth 40-50 % of a CPU step); the bare loop in this process must get them too, and glibc
        # reads them only at start-up.
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, malloc {MALLOC_ENV}")
    store = tempfile.mkdtemp(prefix="vitpipe-bench-")
    base = [f"store={store}", f"pretrain.steps={args.steps}", "pretrain.log_every=5",
            f"pretrain.checkpoint_every={args.steps}", "ingest.limit_per_class=1000", "tracking.enabled=false",
            *args.set]
    # 1. shards (no Ray yet), 2. the bare loop on them, 3. the Ray + DeepSpeed stage: Ray's processes must not be
    # running while the bare loop is timed.
    cfg = resolve_paths(apply_overrides(get_recipe("demo"), [*base, "stages=ingest"]))
    manifest = run_pipeline(cfg, stages_for(cfg), parent_tracker=NullTracker(), progress=False).results[
        "ingest"].path("manifest")
    p = cfg.pretrain
    torch.set_num_threads(os.cpu_count() or 2)
    torch.manual_seed(0)
    model = create(cfg.model)
    stream = ShardStream(manifest, apply_overrides(p.stream, [f"batch_size={p.global_batch}"]), 0, 1)
    bare_ips = bare_steps(model, stream.forever(), min(args.steps, 40), "cpu", False)
    cfg = resolve_paths(apply_overrides(get_recipe("demo"), [*base, "stages=ingest,pretrain"]))
    res = run_pipeline(cfg, stages_for(cfg), parent_tracker=NullTracker(), progress=False)
    ray_ips = res.results["pretrain"].metrics["final_images_per_s"]  # last logging window: steady state
    print(json.dumps({"model": "Ti/4 depth 6 @32 (demo)", "global_batch": p.global_batch,
                      "ray_deepspeed_img_s": round(ray_ips, 1), "bare_loop_img_s": round(bare_ips, 1),
                      "ratio": round(ray_ips / bare_ips, 3)}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--variants", default="B/16,H/14")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--max-batch", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="CPU: extra recipe overrides for both loops, e.g. --set pretrain.zero_stage=1")
    ap.add_argument("--zero-stages", default="1,2,3", type=lambda v: [int(z) for z in v.split(",")])
    args = ap.parse_args()
    if args.device == "cuda":
        args.steps = args.steps or 10
        gpu(args)
    else:
        args.steps = args.steps or 60
        cpu(args)


if __name__ == "__main__":
    main()
