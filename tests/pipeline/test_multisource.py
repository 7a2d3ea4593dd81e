"""Weighted multi-source streams: exact per-source counts, stratified interleave, passes without replacement,
determinism across layouts, mid-epoch and elastic resume, label union, validation."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from vitpipe.pipeline import IngestConfig, ShardStream, SourceSpec, StreamConfig, ingest
from vitpipe.pipeline.order import GlobalOrder, MixOrder, apportion, interleave


def cfg(**kw) -> StreamConfig:
    base = dict(batch_size=8, img_size=16, shuffle_buffer=30, num_workers=0, drop_last=False, epoch_samples=160)
    return StreamConfig(**{**base, **kw})


def run(stream, n=None):
    out = []
    for i, b in enumerate(stream.iter_batches()):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def keys_of(batches) -> list[str]:
    return [k for _, _, ks in batches for k in ks]


@pytest.fixture(scope="module")
def other_shards(tmp_path_factory, make_folder) -> str:
    """20 samples of classes `c` (also a class of `small_shards`) and `d`, in shards of 7/7/6."""
    base = tmp_path_factory.mktemp("other")
    src = make_folder(base / "src", classes=("c", "d"), per_class=10, size=(20, 16), seed=1)
    dest = f"file://{base}/other"
    ingest(str(src), dest, IngestConfig(shard_max_samples=7, num_workers=0))
    return dest


def mix(small, other, **kw):
    """small_shards (150, weight 3) + other (20, weight 1), 160 positions per epoch: quotas 120 / 40."""
    return [SourceSpec(url=small, weight=3.0), SourceSpec(url=other, weight=1.0, **kw)]


# ----- pure order functions -----

def test_apportion_is_exact_largest_remainder():
    assert apportion(160, [3, 1]).tolist() == [120, 40]
    assert apportion(10, [1, 1, 1]).tolist() == [4, 3, 3]  # tie of remainders: the lower index first
    assert apportion(7, [0.5, 0.25, 0.25]).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75: the two .75 remainders win
    assert apportion(5, [1e-9, 1]).tolist() == [0, 5]


@pytest.mark.parametrize("quotas", [[120, 40], [1, 1, 998], [333, 0, 250, 17], [5], [64, 64, 64, 64, 1]])
def test_interleave_exact_counts_and_stratified_windows(quotas):
    q = np.array(quotas)
    E = int(q.sum())
    src, k = interleave(np.arange(E), q)
    for j, n in enumerate(quotas):
        assert k[src == j].tolist() == list(range(n))  # each source's samples exactly once, in order
        # prefix counts within +-(j+1) of x * n / E, windows of any length within +-2(j+1) (see `interleave`)
        pref = np.concatenate([[0], np.cumsum(src == j)])
        assert np.abs(pref - np.arange(E + 1) * n / E).max() < j + 1
        for width in (8, 37):
            if width <= E:
                assert np.abs(pref[width:] - pref[:-width] - width * n / E).max() < 2 * (j + 1)
    # source 0's share of any prefix is exactly floor(x * n0 / E): an independent closed form
    x = np.arange(E + 1)
    assert np.array_equal(np.concatenate([[0], np.cumsum(src == 0)]), x * quotas[0] // E)
    # vectorised lookups of scattered positions agree with the full pass
    pick = np.random.default_rng(0).permutation(E)[: max(1, E // 3)]
    s2, k2 = interleave(pick, q)
    assert np.array_equal(s2, src[pick]) and np.array_equal(k2, k[pick])


def test_one_source_mix_order_is_the_plain_order():
    counts = np.array([7, 0, 13, 5, 9])
    for epoch in (0, 1, 5):
        g, m = GlobalOrder(counts, 3, epoch, 6), MixOrder([counts], [0], [34], 3, epoch, 6)
        pos = np.arange(34)
        shard, idx, passes = m.locate(pos)
        assert [a.tolist() for a in g.lookup(pos)] == [shard.tolist(), idx.tolist()]
        assert set(passes.tolist()) == {epoch}


def test_mix_order_passes_continue_across_epochs_without_replacement():
    """Source 1 (5 samples, quota 7 per epoch): its draws over epochs 0..4 (35 = 7 passes) are 7 full passes, each
    a permutation of its samples, each pass the source's own GlobalOrder of that pass."""
    c0, c1 = np.array([10, 10]), np.array([3, 2])
    draws = []
    for epoch in range(5):
        m = MixOrder([c0, c1], [0, 2], [13, 7], seed=1, epoch=epoch, block=4)
        shard, idx, passes = m.locate(np.arange(20))
        src1 = shard >= 2
        draws += list(zip(passes[src1].tolist(), (shard[src1] - 2).tolist(), idx[src1].tolist()))
    assert len(draws) == 35
    for q in range(7):
        in_pass = [(s, i) for p, s, i in draws if p == q]
        g = GlobalOrder(c1, 1, q, 4, salt=(1,))
        assert in_pass == list(zip(*[a.tolist() for a in g.lookup(np.arange(5))]))


def test_replace_draws_within_blocks_with_replacement():
    counts = np.array([40, 40, 40])
    g = GlobalOrder(counts, 0, 0, block=30, replace=True)
    c = g.concat_index(np.arange(120))
    blocks = np.arange(120) // 30
    assert np.array_equal(c // 30, blocks)  # a draw stays in its shuffle block (shard locality)
    assert len(set(c.tolist())) < 120  # with replacement: repeats and misses
    assert np.array_equal(c, GlobalOrder(counts, 0, 0, block=30, replace=True).concat_index(np.arange(120)))


# ----- streams -----

def test_mix_epoch_counts_labels_and_passes(small_shards, other_shards):
    dflt = ShardStream(mix(small_shards, other_shards), cfg(epoch_samples=None), rank=0, world_size=1)
    assert dflt.total == 170 and [x.quota for x in dflt.sources] == [128, 42]  # None: sum of sizes; 127.5 / 42.5
    s = ShardStream(mix(small_shards, other_shards), cfg(), rank=0, world_size=1)
    assert [(x.name, x.size, x.quota) for x in s.sources] == [("shards", 150, 120), ("other", 20, 40)]
    assert s.classes == ["a", "b", "c", "d"] and s.num_classes == 4 and s.manifest is None
    epochs = []
    for e in range(5):
        batches = run(s)
        assert len(batches) == 20 and s.epoch == e + 1
        for _, y, keys in batches:  # labels remapped into the union class map, by name
            assert [s.classes[i] for i in y.tolist()] == [k.split("/", 1)[1].split("_")[0] for k in keys]
        epochs.append(Counter(keys_of(batches)))
    for c in epochs:  # exact per-source counts every epoch
        assert sum(n for k, n in c.items() if k.startswith("shards/")) == 120
        assert sum(n for k, n in c.items() if k.startswith("other/")) == 40
        assert sorted(n for k, n in c.items() if k.startswith("other/")) == [2] * 20  # 40 = 2 passes of 20
    total = sum(epochs, Counter())
    assert sorted(n for k, n in total.items() if k.startswith("shards/")) == [4] * 150  # 600 draws = 4 passes
    assert s.stats["source_samples"] == {"shards": 600, "other": 200}
    assert s.stats["samples"] == 800


def test_mix_rank_parts_have_exact_source_counts(small_shards, other_shards):
    """Rank r reads positions [80r, 80r + 80): floor(x * 120 / 160) of them are source 0's (`interleave`)."""
    for r in range(2):
        s = ShardStream(mix(small_shards, other_shards), cfg(), rank=r, world_size=2)
        c = Counter(k.split("/")[0] for k in keys_of(run(s)))
        first = 80 * (r + 1) * 120 // 160 - 80 * r * 120 // 160
        assert c == {"shards": first, "other": 80 - first} == {"shards": 60, "other": 20}
        assert s.stats["source_samples"] == {"shards": 60, "other": 20}


def test_mix_order_is_world_and_worker_independent(small_shards, other_shards):
    one = run(ShardStream(mix(small_shards, other_shards), cfg(), rank=0, world_size=1))
    two = [run(ShardStream(mix(small_shards, other_shards), cfg(), rank=r, world_size=2)) for r in range(2)]
    assert keys_of(one) == keys_of(two[0]) + keys_of(two[1])  # the same global order, cut in rank parts
    pixels: dict = {}  # key -> its images this epoch (a repeated sample gets another augmentation per pass)
    for x, _, ks in one:
        for i, k in enumerate(ks):
            pixels.setdefault(k, []).append(x[i])
    assert {len(v) for k, v in pixels.items()} == {1, 2}
    assert not torch.equal(*next(v for v in pixels.values() if len(v) == 2))
    for r in range(2):
        w2 = run(ShardStream(mix(small_shards, other_shards), cfg(num_workers=2, batch_size=5), rank=r,
                             world_size=2))
        assert Counter(keys_of(w2)) == Counter(keys_of(two[r]))  # batch 5 x 16 = 80: the same rank part
        for x, _, ks in w2:
            for i, k in enumerate(ks):  # per-sample augmentation from (seed, pass, key): layout-independent
                assert any(torch.equal(p, x[i]) for p in pixels[k])


@pytest.mark.parametrize("workers", [0, 2])
def test_mix_resume_mid_epoch_is_identical(small_shards, other_shards, workers):
    c = cfg(num_workers=workers)
    full = run(ShardStream(mix(small_shards, other_shards), c, rank=1, world_size=2))
    s = ShardStream(mix(small_shards, other_shards), c, rank=1, world_size=2)
    head = run(s, 3)
    state = json.loads(json.dumps(s.state_dict()))
    assert state["sources"] == [[150, 120, 0, 0], [20, 40, 0, 0]]
    s2 = ShardStream(mix(small_shards, other_shards), c, rank=1, world_size=2)
    s2.load_state_dict(state)
    tail = run(s2)
    assert len(head) + len(tail) == len(full) == 10
    for (x1, y1, k1), (x2, y2, k2) in zip(full, head + tail):
        assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)


@pytest.mark.parametrize("w0,k0,w1", [(2, 4, 1), (1, 6, 2)])
def test_mix_elastic_resume_sees_the_epoch_exactly_once(small_shards, other_shards, w0, k0, w1):
    """2 ranks x 4 batches, then 1 rank (96 left); 1 rank x 6 batches, then 2 ranks (112 left = 7 x 16): the
    seen multiset is exactly the uninterrupted epoch's, and the epoch then ends on every rank."""
    epoch = Counter(keys_of(run(ShardStream(mix(small_shards, other_shards), cfg(), 0, 1))))
    seen, state = [], None
    for r in range(w0):
        s = ShardStream(mix(small_shards, other_shards), cfg(), rank=r, world_size=w0)
        seen += keys_of(run(s, k0))
        state = s.state_dict()
    for r in range(w1):
        s = ShardStream(mix(small_shards, other_shards), cfg(num_workers=2), rank=r, world_size=w1)
        s.load_state_dict(json.loads(json.dumps(state)))
        seen += keys_of(run(s))
        assert s.epoch == 1
    assert Counter(seen) == epoch


def test_mix_resume_refuses_another_mix(small_shards, other_shards):
    s = ShardStream(mix(small_shards, other_shards), cfg(), 0, 1)
    run(s, 2)
    state = s.state_dict()
    other = [SourceSpec(url=small_shards, weight=1.0), SourceSpec(url=other_shards, weight=1.0)]
    t = ShardStream(other, cfg(epoch_samples=160), 0, 1)
    with pytest.raises(ValueError, match="weights, epoch_samples or limits changed"):
        t.load_state_dict(state)


def test_mix_with_replacement(small_shards, other_shards):
    a = ShardStream(mix(small_shards, other_shards, replacement=True), cfg(), 0, 1)
    ka = keys_of(run(a))
    other = Counter(k for k in ka if k.startswith("other/"))
    assert sum(other.values()) == 40 and sorted(other.values()) != [2] * 20  # exact count, drawn with replacement
    assert Counter(k for k in ka if k.startswith("shards/")).most_common(1)[0][1] == 1  # source 0: no repeats
    b = ShardStream(mix(small_shards, other_shards, replacement=True), cfg(), 0, 1)
    head = keys_of(run(b, 4))
    b2 = ShardStream(mix(small_shards, other_shards, replacement=True), cfg(), 0, 1)
    b2.load_state_dict(b.state_dict())
    assert head + keys_of(run(b2)) == ka


def test_same_manifest_twice_and_multi_label_union(tmp_path, small_shards, jpeg_bytes):
    s = ShardStream([(small_shards, 1.0), (small_shards, 1.0)], cfg(epoch_samples=None), 0, 1)
    assert [x.name for x in s.sources] == ["shards", "shards#1"] and s.classes == ["a", "b", "c"]
    batches = run(s)
    got = {}
    for x, _, ks in batches:
        for i, k in enumerate(ks):
            got.setdefault(k.split("/", 1)[1], {})[k.split("/")[0]] = x[i]
    both = [v for v in got.values() if len(v) == 2]
    assert both and all(not torch.equal(v["shards"], v["shards#1"]) for v in both)  # own augmentation per source
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
        rows.append(f"{i}.jpg\t{'x,c' if i % 3 == 0 else 'z'}")
    (tmp_path / "l.tsv").write_text("\n".join(rows))
    ingest(str(tmp_path / "l.tsv"), str(tmp_path / "ml"), IngestConfig(num_workers=0))
    m = ShardStream([(small_shards, 1.0), (str(tmp_path / "ml"), 1.0)], cfg(epoch_samples=32), 0, 1)
    assert m.classes == ["a", "b", "c", "x", "z"] and m.multi_label
    for _, y, keys in run(m):
        assert y.shape == (8, 5) and y.dtype == torch.float32
        for row, k in zip(y, keys):
            on = [m.classes[i] for i in torch.nonzero(row).flatten().tolist()]
            name, key = k.split("/", 1)
            if name == "shards":
                assert on == [key.split("_")[0]]
            else:
                assert on == (["c", "x"] if int(key.rsplit("_", 1)[1]) % 3 == 0 else ["z"])


def test_mix_validation_errors(small_shards, other_shards):
    with pytest.raises(ValueError, match="SourceSpec.weight must be > 0, got 0"):
        SourceSpec(url=small_shards, weight=0)
    with pytest.raises(ValueError, match="SourceSpec.name must be non-empty without '/'"):
        SourceSpec(url=small_shards, name="a/b")
    with pytest.raises(ValueError, match="StreamConfig.epoch_samples must be in"):
        cfg(epoch_samples=0)
    with pytest.raises(ValueError, match="set SourceSpec.exclude/limit per source"):
        ShardStream(mix(small_shards, other_shards), cfg(limit=10), 0, 1)
    with pytest.raises(ValueError, match="replacement needs StreamConfig.shuffle"):
        ShardStream(mix(small_shards, other_shards, replacement=True), cfg(shuffle=False), 0, 1)
    with pytest.raises(ValueError, match="SourceSpec.name values must be unique"):
        ShardStream([SourceSpec(url=small_shards, name="x"), SourceSpec(url=other_shards, name="x")], cfg(), 0, 1)
    with pytest.raises(ValueError, match="must be a SourceSpec or a"):
        ShardStream([small_shards], cfg(), 0, 1)
