"""What vitpipe's training step costs on the host beyond the model's own work: the production pretrain step (the
``Trainer.step()`` a Ray Train worker runs: DeepSpeed engine, loss, non-finite guard, metrics) against a bare loop
of the same model, on CPU, for narrow ViTs with B/16's and H/14's parameter-tensor counts (width 64, depth 12 / 32:
compute is negligible, so the difference is per-tensor host work, the part of a GPU step that the device cannot
hide once the host falls behind).

Per row: bare and production step time (CPU time of the rank's process, median over rounds that interleave the bare
loop and every stage's step of one model: robust to other load on the machine and to its drifting speed), the extra
host microseconds per parameter tensor, host syncs per step (reads of device values outside log steps,
``vitpipe.jobs.train.syncs``), and the ratio. ``legacy`` rows rebuild the step as it was before this benchmark existed
(DeepSpeed's AdamW and clipping, overlap_comm + contiguous_gradients, throughput timer on, three host reads per
micro-batch, at ZeRO-3 DeepSpeed's memory-efficient linear) for comparison in the same run; DeepSpeed installs that
linear process-wide, so only the legacy step runs with it.

    python benchmarks/step_overhead.py                   # ZeRO 1/2/3, world 1 and 2 (gloo), ~5 min on 2 cores
    python benchmarks/step_overhead.py --worlds 1 --zero 2 --rounds 3
    python benchmarks/step_overhead.py --zero 0,1,2,3 --settings cuda,cpu   # + ZeRO-0, and overlap_comm's cost
    python benchmarks/step_overhead.py --precision bf16   # DeepSpeed's bf16 optimizers (what CUDA runs get)

The bare loop: forward, loss, backward, ``clip_grad_norm_`` (foreach), torch's fused AdamW over the same two
parameter groups (world 2: wrapped in DDP; ``--precision bf16``: the forward under bf16 autocast). Settings:
``cuda`` = the DeepSpeed settings a CUDA run gets (at world 1 the same as CPU's), in fp32 unless ``--precision
bf16`` (then without the fp32-only "before" rows). The last line is the summary the README quotes.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import time
import warnings

import torch
import torch.multiprocessing as mp

NARROW = {"B/16": 12, "H/14": 32}  # depth giving the variant's 152 / 392 parameter tensors at width 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def narrow_model(depth: int):
    from vitpipe.models import ViTConfig

    return ViTConfig(width=64, depth=depth, num_heads=2, mlp_dim=256, patch_size=8, img_size=16, num_classes=10)


def production_step(mcfg, zero: int, world: int, rank: int, settings: str, batch: int, precision: str = "fp32"):
    """``Trainer.step`` of the production loop on synthetic batches; returns (step fn, trainer)."""
    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.spec import PretrainSpec
    from vitpipe.jobs.train.synthetic import SyntheticStream
    from vitpipe.jobs.train.trainer import Trainer

    p = PretrainConfig(steps=1 << 30, global_batch=batch * world, micro_batch=batch, zero_stage=zero,
                       precision=precision, warmup_steps=10, log_every=1 << 30, checkpoint_every=1 << 30,
                       num_workers=world)
    spec = PretrainSpec(model=mcfg, pretrain=p, manifest_url="", out_url="")
    t = Trainer(spec, rank=rank, world=world, device=torch.device("cpu"), ds_settings=settings,
                stream=SyntheticStream(batch=batch, img_size=mcfg.img_size, num_classes=mcfg.num_classes,
                                       rank=rank, fixed=True))
    return t.step, t


def bare_step(mcfg, world: int, batch: int, precision: str = "fp32"):
    """The bare loop on the same model and batch (bf16: under autocast, fp32 weights, as the GPU bare loop)."""
    from vitpipe.jobs.train.optim import classification_loss, param_groups
    from vitpipe.models import create

    torch.manual_seed(0)
    model = create(mcfg)
    groups = param_groups(model, 0.1)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(groups, lr=1e-4, fused=True)
    x = torch.randn(batch, 3, mcfg.img_size, mcfg.img_size)
    y = torch.randint(0, mcfg.num_classes, (batch,))
    params = [q for g in groups for q in g["params"]]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x)
        loss = classification_loss(logits.float(), y, "softmax")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def legacy_step(mcfg, zero: int, world: int, batch: int):
    """The step as vitpipe ran it before: DeepSpeed's own AdamW (torch's, unfused) and clipping, overlap_comm +
    contiguous_gradients (its CUDA settings then), the throughput timer on, and per micro-batch an all-reduced
    finiteness check, ``loss.item()`` and an ``.item()`` inside top-1."""
    import deepspeed

    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.ds_config import deepspeed_config
    from vitpipe.jobs.train.optim import classification_loss, param_groups, top1
    from vitpipe.models import create

    p = PretrainConfig(steps=1 << 30, global_batch=batch * world, micro_batch=batch, zero_stage=zero,
                       precision="fp32", warmup_steps=10)
    cfg = deepspeed_config(p, world_size=world, device="cpu", num_params=0)
    cfg.pop("timers")
    cfg["zero_optimization"].update(overlap_comm=True, contiguous_gradients=True)
    if zero == 3:
        cfg["zero_optimization"]["memory_efficient_linear"] = True  # DeepSpeed's default then
    torch.manual_seed(0)
    model = create(mcfg)
    linear = torch.nn.functional.linear
    engine = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)[0]
    # DeepSpeed installs its ZeRO-3 linear process-wide; this step alone runs with it, the bare and vitpipe steps
    # of the same process keep torch's
    ds_linear, torch.nn.functional.linear = torch.nn.functional.linear, linear
    x = torch.randn(batch, 3, mcfg.img_size, mcfg.img_size)
    y = torch.randint(0, mcfg.num_classes, (batch,))

    def step():
        torch.nn.functional.linear = ds_linear
        try:
            logits = engine(x)
            loss = classification_loss(logits, y, "softmax")
            flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0])
            torch.distributed.all_reduce(flag)
            if flag.item() != 0.0:
                raise FloatingPointError
            engine.backward(loss)
            engine.step()
            loss.item()
            top1(logits.detach(), y)
        finally:
            torch.nn.functional.linear = linear

    return step


def timed(fns: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median CPU seconds per step of each function, rounds interleaved (after warm-up steps)."""
    for f in fns.values():
        for _ in range(3):
            f()
    per: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.process_time()
            for _ in range(steps):
                f()
            per[k].append((time.process_time() - t0) / steps)
    return {k: statistics.median(v) for k, v in per.items()}


def syncs_per_step(step, steps: int = 3) -> float:
    from vitpipe.jobs.train.syncs import HostSyncCounter

    with HostSyncCounter(where=False) as c:
        for _ in range(steps):
            step()
    return c.count / steps


def run_world(rank: int, world: int, port: int, args, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    for variant in args.variants:
        mcfg = narrow_model(NARROW[variant])
        n_tensors = depth_tensors(mcfg)
        # every stage's step and the bare loop timed in the same interleaved rounds: the rows of one variant share
        # one bare figure and the same moments of the machine's drifting speed
        fns = {"bare": bare_step(mcfg, world, args.batch, args.precision)}
        trainers = {}
        for zero in args.zero:
            for settings in args.settings:
                fns[zero, settings], trainers[zero, settings] = production_step(mcfg, zero, world, rank, settings,
                                                                                args.batch, args.precision)
            if args.legacy:
                fns[zero, "legacy"] = legacy_step(mcfg, zero, world, args.batch)
        t = timed(fns, args.rounds, args.steps)
        syncs = {k: syncs_per_step(f) for k, f in fns.items() if k != "bare"}
        for (zero, settings), trainer in trainers.items():
            if rank == 0:
                prod = t[zero, settings]
                row = {"variant": variant, "tensors": n_tensors, "zero": zero, "world": world, "settings": settings,
                       "bare_ms": 1e3 * t["bare"], "prod_ms": 1e3 * prod,
                       "us_per_tensor": 1e6 * (prod - t["bare"]) / n_tensors, "syncs": syncs[zero, settings],
                       "ratio": t["bare"] / prod, "attention": trainer.attention}
                if args.legacy:
                    row.update(legacy_ms=1e3 * t[zero, "legacy"],
                               legacy_us_per_tensor=1e6 * (t[zero, "legacy"] - t["bare"]) / n_tensors,
                               legacy_syncs=syncs[zero, "legacy"])
                out[len(out)] = row
                print(fmt(row), flush=True)
            trainer.close()
        del trainers, fns
    torch.distributed.destroy_process_group()


def depth_tensors(mcfg) -> int:
    from vitpipe.models import create

    return len(list(create(mcfg).parameters()))


def fmt(r: dict) -> str:
    s = (f"{r['variant']:5} ({r['tensors']} tensors) ZeRO-{r['zero']} world {r['world']} {r['settings']:4}: "
         f"bare {r['bare_ms']:7.2f} ms, vitpipe {r['prod_ms']:7.2f} ms, {r['us_per_tensor']:+7.1f} us/tensor, "
         f"syncs/step {r['syncs']:.0f}, bare/vitpipe {r['ratio']:.2f}")
    if "legacy_ms" in r:
        s += f" | before: {r['legacy_ms']:7.2f} ms, {r['legacy_us_per_tensor']:+7.1f} us/tensor, " \
             f"syncs/step {r['legacy_syncs']:.0f}"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="B/16,H/14", type=lambda v: v.split(","))
    ap.add_argument("--zero", default="1,2,3", type=lambda v: [int(z) for z in v.split(",")])
    ap.add_argument("--worlds", default="1,2", type=lambda v: [int(w) for w in v.split(",")])
    ap.add_argument("--settings", default="cuda", type=lambda v: v.split(","), help="cuda and/or cpu")
    ap.add_argument("--batch", type=int, default=2, help="images per micro-batch and rank (16 px)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=8, help="steps per round")
    ap.add_argument("--no-legacy", dest="legacy", action="store_false", help="skip the 'before' rows")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                    help="bf16: DeepSpeed's bf16 optimizers (what a CUDA run gets) against the bare loop under "
                         "bf16 autocast")
    args = ap.parse_args()
    args.legacy = args.legacy and args.precision == "fp32"  # the "before" step is rebuilt in fp32 only
    print(f"CPU: {_cpu()}, {os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    rows: list[dict] = []
    for world in args.worlds:
        with mp.Manager() as manager:
            out = manager.dict()
            port = _free_port()
            if world == 1:
                run_world(0, 1, port, args, out)
            else:
                mp.spawn(run_world, args=(world, port, args, out), nprocs=world, join=True)
            rows += [out[i] for i in sorted(out.keys())]
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    summary(rows)


def summary(rows: list[dict]) -> None:
    def pick(variant: str, zero: int) -> str:
        r = [x for x in rows if x["variant"] == variant and x["zero"] == zero and x["world"] == 1
             and x["settings"] == "cuda"]
        return f"{r[0]['us_per_tensor']:.0f}" if r else "n/a"

    syncs = max((r["syncs"] for r in rows), default=float("nan"))
    print(f"default stage below 1B parameters (ZeRO-1): B/16 {pick('B/16', 1)}/tensor, H/14 {pick('H/14', 1)}/tensor")
    print(f"step_overhead: B/16 {pick('B/16', 2)}/tensor, H/14 {pick('H/14', 2)}/tensor (ZeRO-2, CUDA settings), "
          f"ZeRO-3 {pick('H/14', 3)}/tensor, syncs/step {syncs:.0f}")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
