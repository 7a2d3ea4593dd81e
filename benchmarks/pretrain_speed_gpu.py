"""The GPU half of ``benchmarks/pretrain_speed.py --device cuda``: one GPU, bf16, synthetic 224 px batches resident
on the device, MFU over ``--peak-tflops`` (989: H100/H200 dense bf16, the same peak for both).

Rows, in the order they run (each printed when done; a row that would start past ``--budget-s`` is skipped, so a
time-capped call still prints its tables):
1. per variant: the bare loop (autocast bf16, fused AdamW, clip_grad_norm_), then vitpipe's production step
   (``Trainer.step``: the engine ``build_engine`` makes, the default ZeRO stage first, then the others), eager;
2. the step-time breakdown of the default configuration (forward+loss / backward / optimizer step / data wait, the
   device synchronised between phases);
3. per variant: the bare loop with ``torch.compile`` of the model, then vitpipe with ``pretrain.compile=inductor``
   and ``deepcompile`` (default stage, then ZeRO-3), each with its compile time and its first losses against eager;
4. ``--max-batch``: the largest H/14 micro-batch of the default configuration, without and with activation
   checkpointing.
Every vitpipe row names the attention kernel it ran (``engine.attention_backend``) and its host syncs per step.
"""

from __future__ import annotations

import gc
import os
import socket
import time

import torch
import torch.nn.functional as F

from vitpipe.jobs.train.ds_config import default_zero_stage
from vitpipe.jobs.train.hooks import TrainerHooks
from vitpipe.models import create, flops

T0 = time.perf_counter()
DEV, IMG = "cuda", 224  # a smoke run on CPU replaces these (and torch.cuda's timing calls)


def init_dist() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if DEV == "cuda" else "gloo")


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _timed(step, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(seconds per step after ``warmup`` steps, seconds of the warm-up: compilation shows there)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t1) / steps, t1 - t0


def bare(variant: str, batch: int, steps: int, compiled: bool) -> dict:
    from vitpipe.jobs.train.optim import param_groups

    _free()
    torch.manual_seed(0)
    model = create(variant, num_classes=1000, img_size=IMG).to(DEV)
    groups = param_groups(model, 0.1)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    fwd = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, IMG, IMG, device=DEV)
    y = torch.randint(0, 1000, (batch,), device=DEV)

    def step():
        with torch.autocast(DEV, torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt, warm = _timed(step, steps)
    return {"s": dt, "warmup_s": warm, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


class _Losses(TrainerHooks):
    """Test-seam hook that keeps the first micro-batches' loss tensors (read back after the timed steps)."""

    def __init__(self) -> None:
        self.values: list[torch.Tensor] = []

    def on_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        if len(self.values) < 8:
            self.values.append(loss.detach())
        return loss


def trainer(variant: str, batch: int, zero: int | None, compile_mode: str = "none", act_ckpt: bool = False,
            hooks=None):
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.spec import PretrainSpec
    from vitpipe.jobs.train.synthetic import SyntheticStream
    from vitpipe.jobs.train.trainer import Trainer
    from vitpipe.models import ViTConfig

    mcfg = ViTConfig.from_name(variant, img_size=IMG, num_classes=1000)
    p = PretrainConfig(steps=1 << 30, global_batch=batch, micro_batch=batch, zero_stage=zero, lr=1e-4,
                       warmup_steps=2, log_every=1 << 30, checkpoint_every=1 << 30, num_workers=1,
                       use_gpu=DEV == "cuda", compile=compile_mode, activation_checkpointing=act_ckpt)
    device = torch.device("cuda", torch.cuda.current_device()) if DEV == "cuda" else torch.device(DEV)
    return Trainer(PretrainSpec(model=mcfg, pretrain=p, manifest_url="", out_url=""), rank=0, world=1,
                   device=device, hooks=hooks,
                   stream=SyntheticStream(batch=batch, img_size=IMG, num_classes=1000, fixed=True, device=DEV))


def production(variant: str, batch: int, steps: int, zero: int | None, compile_mode: str = "none",
               act_ckpt: bool = False) -> dict:
    from vitpipe.jobs.train.syncs import HostSyncCounter

    _free()
    losses = _Losses()
    t = trainer(variant, batch, zero, compile_mode, act_ckpt, hooks=losses)
    try:
        # DeepCompile re-optimises its graphs at step 5 (prefetch and selective gather for ZeRO-3): time after that
        dt, warm = _timed(t.step, steps, warmup=3 if compile_mode == "none" else 7)
        with HostSyncCounter() as c:
            for _ in range(2):
                t.step()
        return {"s": dt, "warmup_s": warm, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "syncs": c.count / 2, "sync_sites": dict(c.where), "attention": t.attention,
                "zero": t.ds_cfg["zero_optimization"]["stage"], "losses": [float(v) for v in losses.values]}
    finally:
        t.close()
        t.engine.destroy()
        del t


def breakdown(variant: str, batch: int, steps: int = 5) -> dict:
    """Seconds per phase of the default configuration's step, the device synchronised between phases."""
    _free()
    t = trainer(variant, batch, None)
    phases = {"data wait": 0.0, "forward+loss": 0.0, "backward": 0.0, "optimizer step": 0.0}
    try:
        for i in range(steps + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            x, y, _ = next(t._batches)
            t1 = time.perf_counter()
            loss, _ = t._forward(x, y, 0)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            t.engine.backward(loss)
            torch.cuda.synchronize()
            t3 = time.perf_counter()
            t.engine.step()
            torch.cuda.synchronize()
            t4 = time.perf_counter()
            if i >= 2:
                for k, d in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phases[k] += d / steps
        return phases
    finally:
        t.close()
        t.engine.destroy()


def max_batch(variant: str, act_ckpt: bool, start: int) -> tuple[int | None, float | None]:
    best, b = (None, None), start
    while b <= 4096:
        try:
            r = production(variant, b, 2, None, act_ckpt=act_ckpt)
            best = (b, b / r["s"])
            print(f"  {variant} batch {b}{' +act-ckpt' if act_ckpt else ''}: fits, {b / r['s']:.1f} img/s, "
                  f"{r['peak_gib']:.1f} GiB", flush=True)
            b *= 2
        except torch.OutOfMemoryError:
            print(f"  {variant} batch {b}{' +act-ckpt' if act_ckpt else ''}: out of memory", flush=True)
            break
    _free()
    return best


def run(args) -> None:
    if DEV == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    import deepspeed

    init_dist()
    peak = args.peak_tflops * 1e12
    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
          f"peak {args.peak_tflops} TFLOP/s bf16", flush=True)
    batches = dict(kv.split("=") for kv in args.batch.split(","))
    rows: list[dict] = []
    bare_s: dict[tuple[str, bool], float] = {}
    eager_losses: dict[tuple[str, int], list[float]] = {}

    def over_budget(what: str) -> bool:
        if time.perf_counter() - T0 > args.budget_s:
            print(f"skipped (budget {args.budget_s:.0f}s spent): {what}", flush=True)
            return True
        return False

    def add(variant: str, setup: str, r: dict, compiled_base: bool) -> None:
        b = int(batches[variant])
        per_img = flops(create(variant, num_classes=1000, img_size=IMG).cfg)["train_flops"]
        ref = bare_s.get((variant, compiled_base))
        row = {"model": variant, "setup": setup, "batch": b, "img_s": b / r["s"], "mfu": b / r["s"] * per_img / peak,
               "vs_bare": (ref / r["s"]) if ref else None, "peak_gib": r["peak_gib"], "warmup_s": r["warmup_s"],
               "syncs": r.get("syncs"), "attention": r.get("attention", ""), "loss_delta": r.get("loss_delta")}
        rows.append(row)
        print(_fmt(row), flush=True)
        if r.get("sync_sites"):
            print(f"    host syncs at: {r['sync_sites']}", flush=True)

    def prod_row(variant: str, zero: int | None, mode: str, act: bool = False) -> None:
        label = f"vitpipe ZeRO-{zero if zero is not None else 'default'}" + ("" if mode == "none" else f" {mode}") \
            + (" +act-ckpt" if act else "")
        if over_budget(f"{variant} {label}"):
            return
        try:
            r = production(variant, int(batches[variant]), args.steps, zero, mode, act)
        except Exception as e:  # noqa: BLE001 (a mode a machine cannot run is reported, the others still run)
            print(f"{variant:5} {label}: failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}", flush=True)
            return
        label = label.replace("default", f"{r['zero']} (default)")
        key = (variant, r["zero"])
        if mode == "none" and not act:
            eager_losses[key] = r["losses"]
        elif key in eager_losses and r["losses"]:
            r["loss_delta"] = max(abs(a - b) for a, b in zip(r["losses"], eager_losses[key]))
        add(variant, label, r, compiled_base=mode != "none")

    for variant in args.variants:
        if not over_budget(f"{variant} bare"):
            r = bare(variant, int(batches[variant]), args.steps, compiled=False)
            bare_s[(variant, False)] = r["s"]
            add(variant, "bare autocast-bf16 fused AdamW", r, False)
        default = default_zero_stage(sum(p.numel() for p in create(variant, num_classes=1000).parameters()))
        for zero in [None, *[z for z in args.zero_stages if z != default]]:
            prod_row(variant, zero, "none")
        if args.act_ckpt:
            prod_row(variant, None, "none", act=True)
    for variant in args.variants:
        if not over_budget(f"{variant} breakdown"):
            ph = breakdown(variant, int(batches[variant]))
            total = sum(ph.values())
            print(f"{variant} default step breakdown (device synchronised between phases, {total * 1e3:.1f} ms): "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms ({100 * v / total:.0f}%)" for k, v in ph.items()), flush=True)
    for mode in args.compile_modes:  # inductor for both variants before DeepCompile (a JIT build of its ops)
        for variant in args.variants:
            if (variant, True) not in bare_s and not over_budget(f"{variant} bare compiled"):
                r = bare(variant, int(batches[variant]), args.steps, compiled=True)
                bare_s[(variant, True)] = r["s"]
                add(variant, "bare compiled (torch.compile)", r, True)
            for zero in (None, 3):
                prod_row(variant, zero, mode)
    print(f"\n{'model':6} {'setup':40} {'batch':>5} {'img/s':>8} {'MFU':>6} {'vs bare':>8} {'GiB':>6} "
          f"{'warm s':>6} {'syncs':>5}  attention / first losses vs eager")
    for r in rows:
        print(_fmt(r))
    print("vs bare: eager rows against the bare eager loop, compiled rows against the bare compiled loop")
    if args.max_batch and not over_budget("max batch"):
        print(f"\nlargest {args.max_batch_variant} micro-batch per GPU, default configuration (bf16):", flush=True)
        for act in (False, True):
            b, ips = max_batch(args.max_batch_variant, act, int(batches.get(args.max_batch_variant, 32)))
            print(f"  {'with' if act else 'without'} activation checkpointing: {b} ({ips and round(ips, 1)} img/s)")


def _fmt(r: dict) -> str:
    vs = f"{r['vs_bare']:.2f}x" if r["vs_bare"] else "-"
    syncs = f"{r['syncs']:.0f}" if r["syncs"] is not None else "-"
    extra = r["attention"]
    if r.get("loss_delta") is not None:
        extra += f"; first losses within {r['loss_delta']:.1e} of eager"
    return (f"{r['model']:6} {r['setup']:40} {r['batch']:5d} {r['img_s']:8.1f} {100 * r['mfu']:5.1f}% {vs:>8} "
            f"{r['peak_gib']:6.1f} {r['warmup_s']:6.1f} {syncs:>5}  {extra}")
