"""Pure sample-order functions: exactly-once, equal batches, resume identical, elastic resume, global order."""

from __future__ import annotations

import numpy as np
import pytest

from vitpipe.pipeline.order import (
    GlobalOrder, Seq, Segment, next_phase, rank_batch_positions, remaining, segment_sequence, use_sequence,
)


def epoch_batches(total, seg: Segment, history=(), consumed=0):
    """{rank: [positions per batch]} for the rest of an epoch, as the stream would deliver them."""
    R = segment_sequence(total, list(history))
    used, T, _ = use_sequence(R, seg.world, seg.batch, seg.drop_last)
    return {r: rank_batch_positions(used, T, r, seg, consumed) for r in range(seg.world)}, T


@pytest.mark.parametrize("total", [1, 37, 100, 1000, 1003])
@pytest.mark.parametrize("world,workers,batch", [(1, 1, 8), (2, 1, 5), (3, 2, 4), (4, 3, 7), (8, 1, 1)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_exactly_once_equal_batches(total, world, workers, batch, drop_last):
    seg = Segment(world=world, workers=workers, batch=batch, drop_last=drop_last)
    per_rank, T = epoch_batches(total, seg)
    assert all(len(b) == T for b in per_rank.values())  # equal batch counts: no collective hang
    assert all(len(x) == batch for b in per_rank.values() for x in b)
    seen = np.concatenate([x for b in per_rank.values() for x in b]) if T else np.zeros(0, np.int64)
    counts = np.bincount(seen, minlength=total)
    gb = world * batch
    if drop_last:
        assert T == total // gb and counts.max(initial=0) <= 1
        assert total - counts.sum() < gb  # dropped: less than one global batch
    else:
        assert T == -(-total // gb) and counts.min() >= 1
        assert counts.sum() - total < gb  # padding: less than one global batch
        if total >= gb:
            assert counts.max() <= 2


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("k", [0, 1, 4, 7])
def test_resume_same_layout_is_identical(drop_last, workers, k):
    seg = Segment(world=3, workers=workers, batch=4, drop_last=drop_last)
    full, T = epoch_batches(301, seg)
    # continuing in place (same segment, consumed=k) and as a new segment after the old one both match
    cont, _ = epoch_batches(301, seg, consumed=k)
    prev = Segment(**{**seg.__dict__, "consumed": k})
    new = Segment(**{**seg.__dict__, "phase": next_phase(prev, workers)})
    resumed, T2 = epoch_batches(301, new, history=[prev])
    assert T2 == T - k
    for r in range(3):
        assert [x.tolist() for x in cont[r]] == [x.tolist() for x in full[r][k:]]
        assert [x.tolist() for x in resumed[r]] == [x.tolist() for x in full[r][k:]]


@pytest.mark.parametrize("w0,w1,w2", [(2, 3, 1), (4, 2, 5), (3, 3, 2)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_elastic_resume_sees_each_sample_once(w0, w1, w2, drop_last):
    total, B = 997, 6
    history, seen = [], []
    for world, workers, k in [(w0, 2, 9), (w1, 1, 7), (w2, 3, None)]:
        phase = next_phase(history[-1], workers) if history else 0
        seg = Segment(world=world, workers=workers, batch=B, drop_last=drop_last, phase=phase)
        per_rank, T = epoch_batches(total, seg, history)
        k = T if k is None else k
        assert 0 < k <= T
        seen += [x for b in per_rank.values() for x in b[:k]]
        history.append(Segment(**{**seg.__dict__, "consumed": k}))
    counts = np.bincount(np.concatenate(seen), minlength=total)
    assert len(remaining(segment_sequence(total, history[:-1]), history[-1])) < w2 * B
    if drop_last:
        assert counts.max() == 1 and total - counts.sum() < w2 * B
    else:
        assert counts.min() == 1  # every sample seen; padding bounded by one global batch per segment
        assert counts.sum() - total < B * (w0 + w1 + w2)


def test_seq_slice_and_concat():
    s = Seq.concat([Seq([10], [5], [False]), Seq([0], [3], [True]), Seq([100], [4], [False])])
    assert s.positions().tolist() == [10, 11, 12, 13, 14, 0, 1, 2, 100, 101, 102, 103]
    assert s.slice(3, 9).positions().tolist() == [13, 14, 0, 1, 2, 100]
    assert s.slice(3, 9).num_pad == 3 and len(s.strip_pad()) == 9
    assert len(s.slice(20, 30)) == 0


def test_global_order_is_a_bijection_and_changes_per_epoch():
    counts = np.array([7, 0, 13, 5, 9])
    orders = []
    for epoch in (0, 1):
        g = GlobalOrder(counts, seed=3, epoch=epoch, block=6)
        shard, idx = g.lookup(np.arange(g.total))
        pairs = set(zip(shard.tolist(), idx.tolist()))
        assert pairs == {(s, i) for s, c in enumerate(counts) for i in range(c)}
        orders.append(list(zip(shard.tolist(), idx.tolist())))
    assert orders[0] != orders[1]
    g = GlobalOrder(counts, seed=3, epoch=0, block=6, shuffle=False)
    shard, idx = g.lookup(np.arange(g.total))
    assert shard.tolist() == sorted(shard.tolist())  # no shuffle: manifest order


def test_block_shuffle_is_local():
    """A block of S positions only touches the shards overlapping S concatenated samples (bounded memory)."""
    counts = np.full(50, 100)
    g = GlobalOrder(counts, seed=0, epoch=0, block=250)
    shard, _ = g.lookup(np.arange(250, 500))
    assert len(set(shard.tolist())) <= 250 // 100 + 2


def test_rank_parts_are_contiguous_in_the_order():
    """Each rank reads one contiguous stretch of the global order (few shards per rank)."""
    seg = Segment(world=4, workers=1, batch=10, drop_last=True)
    per_rank, T = epoch_batches(1000, seg)
    for r, batches in per_rank.items():
        pos = np.concatenate(batches)
        assert pos.tolist() == list(range(r * T * 10, (r + 1) * T * 10))
