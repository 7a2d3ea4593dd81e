"""Pretraining throughput: vitpipe's DeepSpeed step vs a bare PyTorch loop of the same model and batch, same run.

CPU (default): the full pretrain stage (Ray Train, 2 workers x 1 thread, DeepSpeed, shard streaming) on a
CIFAR-10 slice vs a bare single-process loop (2 threads, AdamW, the same shard stream) -> ratio (target >= 0.9).

GPU (``--device cuda``, ``benchmarks/pretrain_speed_gpu.py``): one GPU, bf16, ViT-B/16 and ViT-H/14: the bare loop
(autocast, fused AdamW) eager and compiled, vitpipe's production step (the engine and ``Trainer.step`` a Ray worker
runs; no benchmark-only optimizer) under each ZeRO stage and compile mode, MFU, peak memory, host syncs per step, the
attention kernel used, the step-time breakdown of the default configuration, the largest H/14 micro-batch.

    python benchmarks/pretrain_speed.py                       # CPU, ~6 min on 2 cores
    python benchmarks/pretrain_speed.py --device cuda --max-batch --budget-s 400
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from vitpipe.models import create


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


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
            t0 = time.perf_counter()
        one(x.to(device), y.to(device))
        n += len(x) if i >= 3 else 0
        if i == steps + 2:
            break
    return n / (time.perf_counter() - t0)


def cpu(args) -> None:
    from vitpipe.jobs.stages import stages_for
    from vitpipe.jobs.config import resolve_paths
    from vitpipe.jobs.core.configtools import apply_overrides
    from vitpipe.jobs.config.recipes import get_recipe
    from vitpipe.jobs.run.runner import run_pipeline
    from vitpipe.jobs.core.tracking import NullTracker
    from vitpipe.pipeline import ShardStream

    from vitpipe.jobs.core.raytools import MALLOC_ENV

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
    ray_ips = res.results["pretrain"].info["final"]["train/images_per_s"]  # last logging window: steady state
    print(json.dumps({"model": "Ti/4 depth 6 @32 (demo)", "global_batch": p.global_batch,
                      "ray_deepspeed_img_s": round(ray_ips, 1), "bare_loop_img_s": round(bare_ips, 1),
                      "ratio": round(ray_ips / bare_ips, 3)}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (CPU: pretrain steps)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="CPU: extra recipe overrides for both loops, e.g. --set pretrain.zero_stage=1")
    gpu_args = ap.add_argument_group("--device cuda")
    gpu_args.add_argument("--variants", default="B/16,H/14", type=lambda v: v.split(","))
    gpu_args.add_argument("--batch", default="B/16=256,H/14=64", help="micro-batch per variant")
    gpu_args.add_argument("--peak-tflops", type=float, default=989.0)
    gpu_args.add_argument("--zero-stages", default="1,2,3", type=lambda v: [int(z) for z in v.split(",")],
                          help="eager rows: the default stage first, then these")
    gpu_args.add_argument("--compile-modes", default="inductor,deepcompile",
                          type=lambda v: [m for m in v.split(",") if m], help="compiled rows ('' for none)")
    gpu_args.add_argument("--act-ckpt", action="store_true", help="add an activation-checkpointing row")
    gpu_args.add_argument("--max-batch", action="store_true")
    gpu_args.add_argument("--max-batch-variant", default="H/14")
    gpu_args.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    args = ap.parse_args()
    if args.device == "cuda":
        import pretrain_speed_gpu  # benchmarks/ is on sys.path when this runs as a script

        args.steps = args.steps or 10
        pretrain_speed_gpu.run(args)
    else:
        args.steps = args.steps or 60
        cpu(args)


if __name__ == "__main__":
    main()
