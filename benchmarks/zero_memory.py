"""Per-rank model + optimizer state bytes and peak memory under DeepSpeed ZeRO 0/1/2/3, 2 gloo ranks, same model.

State bytes are counted tensor by tensor on each rank after one training step: the module's parameters as held by
the rank (ZeRO-3 keeps only its partition), DeepSpeed's fp32 master partitions, and the optimizer's Adam moments.
Peak memory is the rank's max RSS. Ratios are against ZeRO-0 measured in the same run (target: ZeRO-3 <= 0.55x).

    python benchmarks/zero_memory.py                 # ViT-B/16 at 224, bf16 mixed precision, ~3 min on 2 cores
    python benchmarks/zero_memory.py --precision fp32   # fp32 (CPU training): ZeRO-3 keeps a redundant fp32 copy
    python benchmarks/zero_memory.py --variant S/16
"""

from __future__ import annotations

import argparse
import os
import resource
import socket

import torch
import torch.multiprocessing as mp


def _bytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def state_bytes(engine) -> dict[str, int]:
    """What this rank holds: parameters, fp32 master copies, optimizer moments."""
    params = 0
    for p in engine.module.parameters():
        params += _bytes(p.ds_tensor) if hasattr(p, "ds_tensor") else _bytes(p)
    opt = engine.optimizer
    master = 0
    # where each DeepSpeed optimizer wrapper keeps its fp32 master weights (ZeRO-1/2, ZeRO-3, bf16, bf16 ZeRO-0)
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups"):
        for t in getattr(opt, name, None) or []:
            master += sum(_bytes(x) for x in t) if isinstance(t, (list, tuple)) else _bytes(t)
    inner = getattr(opt, "optimizer", opt)
    moments = sum(_bytes(v) for st in inner.state.values() for v in st.values())
    return {"params": params, "master": master, "moments": moments, "total": params + master + moments}


def _worker(rank: int, world: int, port: int, stage: int, variant: str, img: int, precision: str,
            out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import deepspeed

    from vitpipe.jobs.train.config import PretrainConfig
    from vitpipe.jobs.train.ds_config import deepspeed_config
    from vitpipe.jobs.train.optim import param_groups
    from vitpipe.models import create

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = create(variant, num_classes=1000, img_size=img)
    # vitpipe refuses ZeRO-0 in bf16 (ds_config.check_stage_precision: a host sync per gradient tensor); the
    # reference row is DeepSpeed's own ZeRO-0 bf16 optimizer, from the ZeRO-1 config with the stage set back to 0
    p = PretrainConfig(steps=10, global_batch=2 * world, micro_batch=2, zero_stage=max(stage, 1), warmup_steps=1,
                       precision=precision)
    cfg = deepspeed_config(p, world_size=world, device="cpu", num_params=0)
    cfg["zero_optimization"]["stage"] = stage
    engine = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.1), config=cfg)[0]
    x, y = torch.randn(2, 3, img, img), torch.randint(0, 1000, (2,))
    if precision == "bf16":
        x = x.to(torch.bfloat16)
    loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
    engine.backward(loss)
    engine.step()
    st = state_bytes(engine)
    st["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out[rank] = st


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="B/16")
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"],
                    help="bf16 mixed precision (how pretraining runs on GPUs; fp32 master + bf16 weights) or fp32")
    args = ap.parse_args()
    rows = {}
    for stage in (0, 1, 2, 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with mp.Manager() as manager:
            out = manager.dict()
            mp.start_processes(_worker, args=(2, port, stage, args.variant, args.img, args.precision, out), nprocs=2,
                               start_method="spawn")
            rows[stage] = dict(out)
    base = max(r["total"] for r in rows[0].values())
    print(f"ViT-{args.variant}@{args.img}, 2 ranks (gloo, CPU, {args.precision}); per-rank bytes, max over ranks")
    print(f"{'ZeRO':>4} {'params MB':>10} {'master MB':>10} {'moments MB':>11} {'state MB':>9} {'ratio':>6} "
          f"{'peak RSS MB':>11}")
    for stage, ranks in rows.items():
        r = max(ranks.values(), key=lambda v: v["total"])
        print(f"{stage:>4} {r['params'] / 2**20:10.0f} {r['master'] / 2**20:10.0f} {r['moments'] / 2**20:11.0f} "
              f"{r['total'] / 2**20:9.0f} {r['total'] / base:6.2f} {max(v['peak_rss'] for v in ranks.values()) / 2**20:11.0f}")


if __name__ == "__main__":
    main()
