"""Class-balanced stream-time subsets: exact balance, nesting, exclusions, label index and its fallback, batch
counts, resume, a subset per source of a mix."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vitpipe.pipeline import IngestConfig, Manifest, ShardStream, SourceSpec, StreamConfig, balanced_subset, ingest
from vitpipe.pipeline.tars import parse_shard
from vitpipe.pipeline.subset import read_label_index


def cfg(**kw) -> StreamConfig:
    base = dict(batch_size=1, img_size=16, shuffle_buffer=30, num_workers=0, drop_last=False)
    return StreamConfig(**{**base, **kw})


def keys(stream, n=None) -> list[str]:
    out = []
    for i, (_, _, ks) in enumerate(stream.iter_batches()):
        out += ks
        if n is not None and i + 1 == n:
            break
    return out


def cls(key: str) -> str:
    return key.split("/")[-1].split("_")[0]


def reference(labels, limit, seed, num_classes, alive=None):
    """The documented rule, written out with plain loops: per class, samples by (shard rank, rank in shard);
    then round j = 0, 1, ... takes the j-th sample of every class that has one, classes in the seeded order."""
    S = len(labels)
    shard_rank = {int(s): r for r, s in enumerate(np.random.default_rng([seed, 0x5B5E7]).permutation(S))}
    per_class = {c: [] for c in range(num_classes)}
    for s, lab in enumerate(labels):
        within = np.random.default_rng([seed, s, 0x5B5E7]).permutation(len(lab))
        post = -1
        for i, c in enumerate(lab.tolist()):
            if alive is not None and alive[s] is not None and not alive[s][i]:
                continue
            post += 1
            per_class[c].append(((shard_rank[s], int(within[i])), (s, post)))
    for c in per_class:
        per_class[c].sort()
    class_seq = np.random.default_rng([seed, 0xC1A55]).permutation(num_classes).tolist()  # first class first
    chosen, j = [], 0
    while len(chosen) < limit:
        for c in class_seq:
            if j < len(per_class[c]) and len(chosen) < limit:
                chosen.append(per_class[c][j][1])
        j += 1
    return sorted(chosen)


def flat(selection) -> list[tuple[int, int]]:
    return sorted((s, int(i)) for s, idx in enumerate(selection) for i in idx)


# ----- the pure selection -----

@pytest.mark.parametrize("limit", [1, 7, 50, 51, 207])
def test_balanced_subset_matches_the_reference_and_water_fills(limit):
    rng = np.random.default_rng(3)
    sizes = {0: 5, 1: 100, 2: 100, 3: 3}  # imbalanced, shuffled over 4 shards (as ingest shuffles items)
    pool = rng.permutation(np.repeat(list(sizes), list(sizes.values())))
    labels = np.split(pool, [60, 120, 180])
    got = balanced_subset(labels, limit, seed=11, num_classes=4)
    assert flat(got) == reference(labels, limit, 11, 4)
    counts = Counter(int(labels[s][i]) for s, i in flat(got))
    # water-filling, computed independently: the highest level q with sum(min(n_c, q)) <= limit, the rest
    # one each to classes that still have samples
    q = max(q for q in range(101) if sum(min(n, q) for n in sizes.values()) <= limit)
    base = {c: min(n, q) for c, n in sizes.items()}
    extra = limit - sum(base.values())
    assert sum(counts.values()) == limit
    assert all(counts[c] - base[c] in (0, 1) for c in sizes) and sum(counts[c] - base[c] for c in sizes) == extra
    assert all(counts[c] == base[c] for c in sizes if sizes[c] <= q)


def test_subsets_are_nested_balanced_and_read_few_shards():
    """5k inside 15k of a 50k, 10-class set in 10 class-mixed shards; 500 / 1500 per class exactly."""
    rng = np.random.default_rng(0)
    labels = np.split(rng.permutation(np.repeat(np.arange(10), 5000)), 10)
    small, big = flat(balanced_subset(labels, 5000, 0, 10)), flat(balanced_subset(labels, 15000, 0, 10))
    assert set(small) <= set(big)
    for sel, n in ((small, 500), (big, 1500)):
        assert Counter(int(labels[s][i]) for s, i in sel) == {c: n for c in range(10)}
    assert len({s for s, _ in small}) == 2  # 5k of 50k from 2 of the 10 shards: the subset streams cheaply
    other = flat(balanced_subset(labels, 5000, 1, 10))
    assert other != small  # another limit_seed, another subset


def test_exclusions_replace_within_the_class():
    rng = np.random.default_rng(1)
    labels = np.split(rng.permutation(np.repeat(np.arange(3), 40)), [50, 90])
    base = flat(balanced_subset(labels, 30, 5, 3))
    drop = base[::7]  # five subset members excluded (by dedup, say)
    alive = [np.ones(len(x), bool) for x in labels]
    for s, i in drop:
        alive[s][i] = False
    post = [np.cumsum(a) - 1 for a in alive]  # raw index -> index among the alive samples
    got = balanced_subset(labels, 30, 5, 3, alive)
    assert flat(got) == reference(labels, 30, 5, 3, alive)
    raw_of = [np.flatnonzero(a) for a in alive]
    got_raw = {(s, int(raw_of[s][i])) for s, i in flat(got)}
    assert len(got_raw) == 30 and not got_raw & set(drop)
    assert set(base) - set(drop) <= got_raw  # the others stay
    assert Counter(int(labels[s][i]) for s, i in got_raw) == {0: 10, 1: 10, 2: 10}
    assert all(post[s][i] >= 0 for s, i in got_raw)


# ----- streams -----

def test_stream_subset_is_exact_and_balanced(small_shards):
    s = ShardStream(small_shards, cfg(limit=61), 0, 1)
    assert s.total == 61 and s.batches_per_epoch() == 61
    got = keys(s)
    assert len(got) == len(set(got)) == 61
    assert sorted(Counter(cls(k) for k in got).values()) == [20, 20, 21]
    assert s.state_dict()["sources"] == [[61, 61, 61, 0]]
    again = keys(ShardStream(small_shards, cfg(limit=61, seed=9), 0, 1))  # another order seed, the same subset
    assert set(again) == set(got) and again != got
    assert set(keys(ShardStream(small_shards, cfg(limit=61, limit_seed=1), 0, 1))) != set(got)


def test_stream_subsets_are_nested(small_shards):
    k15, k45 = (set(keys(ShardStream(small_shards, cfg(limit=n), 0, 1))) for n in (15, 45))
    assert k15 < k45
    assert Counter(cls(k) for k in k15) == {"a": 5, "b": 5, "c": 5}
    assert Counter(cls(k) for k in k45) == {"a": 15, "b": 15, "c": 15}


@pytest.mark.parametrize("drop_last", [True, False])
def test_subset_batch_counts_exact_across_ranks(small_shards, drop_last):
    c = cfg(limit=45, batch_size=4, drop_last=drop_last)
    runs = [keys(ShardStream(small_shards, c, r, 2)) for r in range(2)]
    T = 45 // 8 if drop_last else -(-45 // 8)
    assert len(runs[0]) == len(runs[1]) == 4 * T
    assert ShardStream(small_shards, c, 0, 2).batches_per_epoch() == T
    seen = Counter(runs[0] + runs[1])
    full = set(keys(ShardStream(small_shards, cfg(limit=45), 0, 1)))
    assert set(seen) <= full and (len(seen) == 40 if drop_last else set(seen) == full)


def test_subset_composes_with_exclusions(tmp_path, small_shards):
    m = Manifest.load(small_shards)
    base = keys(ShardStream(m, cfg(limit=30), 0, 1))
    drop = base[:3]
    by_shard: dict = {}
    index = read_label_index(m)
    for k in drop:
        s = next(i for i, (ks, _) in enumerate(index) if k in ks)
        by_shard.setdefault(m.shards[s].name, []).append(k)
    (tmp_path / "excl.json").write_text(json.dumps(by_shard))
    got = keys(ShardStream(m, cfg(limit=30, exclude=str(tmp_path / "excl.json")), 0, 1))
    assert len(got) == len(set(got)) == 30 and not set(got) & set(drop)
    assert set(base) - set(drop) <= set(got)
    assert Counter(cls(k) for k in got) == {"a": 10, "b": 10, "c": 10}
    with pytest.raises(ValueError, match="StreamConfig.limit: limit 148 is more than the 147 samples available"):
        ShardStream(m, cfg(limit=148, exclude=str(tmp_path / "excl.json")), 0, 1)


def test_label_index_matches_the_shards_and_the_fallback_gives_the_same_subset(tmp_path, small_shards, caplog):
    m = Manifest.load(small_shards)
    index = read_label_index(m)
    for s, (ks, labels) in enumerate(index):
        samples, _ = parse_shard(open(m.url(s).replace("file://", ""), "rb").read(), set())
        assert ks == [k for k, _, _ in samples] and labels.tolist() == [lab for _, _, lab in samples]
    shutil.copytree(small_shards.replace("file://", ""), tmp_path / "old")
    for side in Path(tmp_path / "old").glob("*.info.json"):  # as ingest wrote them before the index existed
        meta = json.loads(side.read_text())
        del meta["index"]
        side.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        old = keys(ShardStream(str(tmp_path / "old"), cfg(limit=30), 0, 1))
    assert "7 of 7 shards" in caplog.text and "no label index" in caplog.text
    assert old == keys(ShardStream(small_shards, cfg(limit=30), 0, 1))


def test_subset_resume_and_elastic(small_shards):
    c = cfg(limit=48, batch_size=4)
    full = Counter(keys(ShardStream(small_shards, c, 0, 1)))
    seen, state = [], None
    for r in range(2):
        s = ShardStream(small_shards, c, r, 2)
        seen += keys(s, 2)
        state = json.loads(json.dumps(s.state_dict()))
    s1 = ShardStream(small_shards, c, 0, 1)
    s1.load_state_dict(state)
    seen += keys(s1)
    assert Counter(seen) == full and s1.epoch == 1
    with pytest.raises(ValueError, match="limits changed"):
        ShardStream(small_shards, cfg(limit=48, batch_size=4, limit_seed=3), 0, 1).load_state_dict(state)


def test_multi_label_balances_by_first_label(tmp_path, jpeg_bytes):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
        rows.append(f"{i}.jpg\t{'x,y' if i % 3 == 0 else 'z'}")  # first labels: x (4 samples), z (8)
    (tmp_path / "l.tsv").write_text("\n".join(rows))
    ingest(str(tmp_path / "l.tsv"), str(tmp_path / "o"), IngestConfig(num_workers=0))
    got = keys(ShardStream(str(tmp_path / "o"), cfg(limit=6), 0, 1))
    firsts = Counter("x" if int(k.rsplit("_", 1)[1]) % 3 == 0 else "z" for k in got)
    assert firsts == {"x": 3, "z": 3}


def test_subset_per_source_of_a_mix(small_shards):
    s = ShardStream([SourceSpec(url=small_shards, limit=30, name="sub"), SourceSpec(url=small_shards, name="all")],
                    cfg(epoch_samples=60), 0, 1)
    assert [(x.size, x.quota) for x in s.sources] == [(30, 30), (150, 30)]
    got = keys(s)
    sub = [k.split("/", 1)[1] for k in got if k.startswith("sub/")]
    assert set(sub) == set(keys(ShardStream(small_shards, cfg(limit=30), 0, 1)))
    with pytest.raises(ValueError, match="StreamConfig.limit must be >= 1, got 0"):
        cfg(limit=0)
    with pytest.raises(ValueError, match="SourceSpec.limit of source 'sub': limit 151"):
        ShardStream([SourceSpec(url=small_shards, limit=151, name="sub"), (small_shards, 1.0)], cfg(), 0, 1)
