"""Two real processes on gloo: every rank gets the same number of batches on uneven shards (no collective hang)."""

from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import socket

import pytest
import torch
import torch.distributed as dist

from vitpipe.pipeline import ShardStream, StreamConfig


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, url: str, drop_last: bool, workers: int, out: str) -> None:
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


@pytest.mark.parametrize("drop_last,workers", [(True, 0), (False, 1)])
def test_two_gloo_ranks_get_equal_batches(tmp_path, small_shards, drop_last, workers):
    ctx = mp.get_context("fork")  # the rank function lives in this test module (not importable under spawn)
    port, out = _free_port(), str(tmp_path / "rank")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, small_shards, drop_last, workers, out))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (unequal batch counts would do this)"
    assert all(p.exitcode == 0 for p in procs)
    res = [json.load(open(f"{out}.{r}")) for r in range(2)]
    # 150 samples over 7 shards of 22/22/22/22/22/22/18, global batch 14
    expected = 150 // 14 if drop_last else -(-150 // 14)
    assert [r["steps"] for r in res] == [expected, expected] and res[0]["min"] == res[0]["max"]
    keys = res[0]["keys"] + res[1]["keys"]
    assert len(set(keys)) == (len(keys) if drop_last else 150)
