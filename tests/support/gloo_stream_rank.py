"""Rank entry point for tests/pipeline/test_distributed.py (importable, so the test can use spawn)."""

from __future__ import annotations

import datetime
import json

import torch
import torch.distributed as dist
from vitpipe.pipeline import ShardStream, StreamConfig


def rank_main(rank: int, world: int, port: int, url: str, drop_last: bool, workers: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        cfg = StreamConfig(batch_size=7, img_size=16, shuffle_buffer=25, drop_last=drop_last, num_workers=workers)
        stream = ShardStream(url, cfg, rank=rank, world_size=world)
        steps, keys = 0, []
        for _, labels, ks in stream.iter_batches():
            # one collective per step, as DDP/ZeRO do: an uneven batch count would hang here
            t = torch.tensor([labels.shape[0]], dtype=torch.int64)
            dist.all_reduce(t)
            assert t.item() == world * 7
            steps += 1
            keys += ks
        lo, hi = torch.tensor([steps]), torch.tensor([steps])
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"steps": steps, "min": lo.item(), "max": hi.item(), "keys": keys,
                       "expected": stream.batches_per_epoch() if steps else -1}, f)
    finally:
        dist.destroy_process_group()
