"""JFT-300M on paper: plan an epoch of 30,000 shards x 10,000 samples over 512 ranks x 8 loader workers.

    python benchmarks/data_scale.py [--shards 30000] [--per-shard 10000] [--world 512] [--workers 8]

Measures, in this process: time to compute the epoch's assignment for every (rank, worker), the first batch's
sample lookup on one worker, an elastic mid-epoch resume (512 -> 384 ranks) and its exactly-once check, memory
used (tracemalloc peak), and balance (samples per rank, padding / dropped, shards read per rank). The baseline
for the ratios is `np.random.permutation` of the full 300M-sample index, i.e. what a naive global shuffle costs.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc

import numpy as np

from vitpipe.pipeline.order import (
    GlobalOrder, Segment, batch_positions, count_mod, next_phase, remaining, segment_sequence, use_sequence, worker_part,
)


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=30_000)
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--world", type=int, default=512)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="per rank (global 4096 at 512 ranks, as in the paper)")
    p.add_argument("--shuffle-buffer", type=int, default=20_000)
    p.add_argument("--dedup-test", type=int, default=10_000, help="downstream test images (hashes)")
    p.add_argument("--dedup-ref", type=int, default=10_000_000, help="pretraining samples (hashes)")
    p.add_argument("--baseline-samples", type=int, default=30_000_000,
                   help="size of the naive full-permutation baseline (scaled linearly to the full dataset)")
    args = p.parse_args()
    print(f"CPU: {cpu_model()} x {os.cpu_count()} | load avg {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    # uneven shards, like real ingests: 10,000 +- 2%
    counts = rng.integers(int(args.per_shard * 0.98), int(args.per_shard * 1.02) + 1, args.shards)
    total = int(counts.sum())
    W, n, B = args.world, args.workers, args.batch
    print(f"plan: {args.shards:,} shards, {total:,} samples, {W} ranks x {n} workers, batch {B}/rank "
          f"({W * B} global), shuffle block {args.shuffle_buffer:,}")

    tracemalloc.start()
    t0 = time.perf_counter()
    seg = Segment(world=W, workers=n, batch=B, drop_last=True)
    used, T, tail = use_sequence(segment_sequence(total, []), W, B, True)
    parts = [[worker_part(used, T, r, v, seg) for v in range(n)] for r in range(W)]
    t_assign = time.perf_counter() - t0

    t0 = time.perf_counter()  # what one rank computes at start: its own n worker streams
    used_r, T_r, _ = use_sequence(segment_sequence(total, []), W, B, True)
    mine = [worker_part(used_r, T_r, 137, v, seg) for v in range(n)]
    t_rank = time.perf_counter() - t0
    assert [len(q) for q in mine] == [len(q) for q in parts[137]]

    t0 = time.perf_counter()
    order = GlobalOrder(counts, seed=0, epoch=3, block=args.shuffle_buffer)
    shard, idx = order.lookup(batch_positions(used, T, 137, seg, 0))
    t_first = time.perf_counter() - t0

    # elastic resume: 40% into the epoch, restart on 384 ranks with 4 workers
    k = int(T * 0.4)
    t0 = time.perf_counter()
    prev = Segment(world=W, workers=n, batch=B, drop_last=True, consumed=k)
    R2 = remaining(segment_sequence(total, []), prev)
    seg2 = Segment(world=384, workers=4, batch=B, drop_last=True, phase=next_phase(prev, 4))
    used2, T2, _ = use_sequence(R2, 384, B, True)
    first2 = batch_positions(used2, T2, 0, seg2, 0)
    t_resume = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    # exactly-once, checked on interval arithmetic (no 300M arrays): seen + remaining == all, no overlap
    seen = W * k * B
    assert seen + len(R2) == T * W * B + len(tail), "resume lost or duplicated samples"
    done = [count_mod(0, k, n, v) * B for v in range(n)]  # batches each virtual worker has served
    seen_parts = [parts[r][v].slice(0, done[v]) for r in range(W) for v in range(n)]
    assert sum(len(q) for q in seen_parts) == seen
    starts = np.concatenate([q.starts for q in seen_parts] + [R2.starts])
    lens = np.concatenate([q.lens for q in seen_parts] + [R2.lens])
    o = np.argsort(starts)
    assert np.all(starts[o][1:] >= (starts[o] + lens[o])[:-1]), "overlapping intervals"

    per_rank = [sum(len(p) for p in parts[r]) for r in range(W)]
    per_worker = [len(p) for r in range(W) for p in parts[r]]
    # shards each rank reads: those overlapping its stretch of the concatenated order (+ shuffle-block margins)
    S = args.shuffle_buffer
    reads = []
    for r in range(0, W, max(1, W // 64)):
        a, b = r * T * B, (r + 1) * T * B
        lo, hi = (a // S) * S, min(total, -(-b // S) * S)
        reads.append(int(np.searchsorted(order.cum, hi, "left") - np.searchsorted(order.cum, lo, "right") + 1))

    t0 = time.perf_counter()
    np.random.default_rng(0).permutation(args.baseline_samples)
    t_base = (time.perf_counter() - t0) * total / args.baseline_samples
    print(f"epoch assignment, all {W * n:,} (rank, worker) streams : {t_assign * 1e3:8.1f} ms")
    print(f"one rank's own assignment ({n} worker streams)            : {t_rank * 1e3:8.1f} ms")
    print(f"first batch lookup on one worker (shard perm + block)  : {t_first * 1e3:8.1f} ms")
    print(f"elastic resume 512 -> 384 ranks at 40% of the epoch     : {t_resume * 1e3:8.1f} ms "
          f"({len(R2.starts):,} intervals)")
    print(f"naive baseline: permute all {total:,} indices (scaled)   : {t_base * 1e3:8.1f} ms "
          f"(+{total * 8 / 2**30:.1f} GiB)  -> assignment {t_base / t_assign:.0f}x faster")
    print(f"peak Python memory of the planning above               : {peak / 2**20:8.1f} MiB")
    print(f"batches/rank {T:,} | samples/rank min {min(per_rank):,} max {max(per_rank):,} "
          f"(max/min {max(per_rank) / min(per_rank):.4f}) | per worker {min(per_worker):,}-{max(per_worker):,}")
    print(f"dropped (drop_last) {len(tail):,} samples = {len(tail) / total:.2e} of the epoch; with drop_last=False "
          f"padding would be {(-total) % (W * B):,}")
    print(f"shards read per rank: {min(reads)}-{max(reads)} of {args.shards:,} "
          f"(~{total / W / args.per_shard:.1f} shards of data per rank)")
    print(f"after resume: {T2:,} batches/rank on 384 ranks; first batch reads shards "
          f"{sorted(set(order.lookup(first2)[0].tolist()))[:4]}...")
    dedup_scale(args.dedup_test, args.dedup_ref)


def dedup_scale(n_test: int, n_ref: int, max_distance: int = 4) -> None:
    """De-duplication matching at scale: `n_ref` pretraining pHashes streamed through a band index of `n_test`
    downstream test hashes, vs the all-pairs XOR+popcount it replaced (timed on a slice, scaled)."""
    from vitpipe.pipeline.dedup import BandIndex, _brute_pairs

    rng = np.random.default_rng(0)
    test = rng.integers(0, 2**63, n_test, dtype=np.int64).astype(np.uint64)
    t0 = time.perf_counter()
    index = BandIndex(test, max_distance)
    t_build = time.perf_counter() - t0
    chunk, found, t_search = 1_000_000, 0, 0.0
    for s in range(0, n_ref, chunk):
        ref = rng.integers(0, 2**63, min(chunk, n_ref - s), dtype=np.int64).astype(np.uint64)
        ref[:10] = test[:10] ^ np.uint64(0b1011)  # planted near-duplicates in every chunk
        t0 = time.perf_counter()
        found += len(index.search(ref)[0])
        t_search += time.perf_counter() - t0
    sl = 20_000
    t0 = time.perf_counter()
    _brute_pairs(test, ref[:sl], max_distance, 2048)
    t_brute = (time.perf_counter() - t0) * n_ref / sl
    print(f"\ndedup matching, {n_test:,} test hashes x {n_ref:,} pretraining hashes, <= {max_distance} bits:")
    print(f"band index build {t_build * 1e3:.1f} ms | search {t_search:.1f} s ({n_ref / t_search / 1e6:.1f} M "
          f"hashes/s, {found:,} pairs = the {10 * -(-n_ref // chunk):,} planted) | all-pairs popcount "
          f"(scaled from {sl:,}) {t_brute:.0f} s -> {t_brute / t_search:.0f}x")
    print(f"JFT-300M at this rate: {300e6 / (n_ref / t_search) / 60:.1f} min of matching on one core "
          f"(pHash of the images dominates: it runs in the shard-parallel workers)")


if __name__ == "__main__":
    main()
