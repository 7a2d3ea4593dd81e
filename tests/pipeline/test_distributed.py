"""Two real processes on gloo: every rank gets the same number of batches on uneven shards (no collective hang)."""

from __future__ import annotations

import json
import multiprocessing as mp
import socket

import pytest
from gloo_stream_rank import rank_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("drop_last,workers", [(True, 0), (False, 1)])
def test_two_gloo_ranks_get_equal_batches(tmp_path, small_shards, drop_last, workers):
    ctx = mp.get_context("spawn")  # fork would inherit a process group other tests keep for the session
    port, out = _free_port(), str(tmp_path / "rank")
    procs = [ctx.Process(target=rank_main, args=(r, 2, port, small_shards, drop_last, workers, out))
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
