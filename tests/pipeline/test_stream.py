"""ShardStream end to end on real shards: batches, exactly-once, determinism, resume, elastic, bad data."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch
from vitpipe.pipeline import IngestConfig, Manifest, ShardStream, StreamConfig, ingest
from vitpipe.pipeline.tars import iter_tar


def cfg(**kw) -> StreamConfig:
    base = dict(batch_size=8, img_size=16, shuffle_buffer=30, num_workers=0)
    return StreamConfig(**{**base, **kw})


def run(stream, n=None):
    """(images, labels, keys) lists of the next n batches (all remaining when None)."""
    out = []
    for i, b in enumerate(stream.iter_batches()):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def keys_of(batches) -> list[str]:
    return [k for _, _, ks in batches for k in ks]


def test_batches_shapes_labels_and_normalisation(small_shards):
    m = Manifest.load(small_shards)
    s = ShardStream(small_shards, cfg(), rank=0, world_size=1)
    t0 = time.perf_counter()
    batches = run(s)
    wall = time.perf_counter() - t0
    assert len(batches) == s.batches_per_epoch() == len(s) == 150 // 8
    x, y, keys = batches[0]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert -1.0 <= x.min() < 0 < x.max() <= 1.0
    for _, y, keys in batches:
        assert [m.classes[i] for i in y.tolist()] == [k.split("_")[0] for k in keys]
    assert s.stats["samples"] == 144 and s.stats["batches"] == len(batches) and s.stats["skipped_corrupt"] == 0
    # the consumer's time waiting for batches: measured (every batch here is decoded on demand) and within the loop
    assert 0 < s.stats["wait_s"] <= wall and s.stats["last_wait_s"] <= s.stats["wait_s"]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_exactly_once_across_ranks_and_workers(small_shards, workers, drop_last):
    per_rank = []
    for r in range(2):
        s = ShardStream(small_shards, cfg(num_workers=workers, drop_last=drop_last), rank=r, world_size=2)
        per_rank.append(run(s))
    assert len(per_rank[0]) == len(per_rank[1]) == (9 if drop_last else 10)
    counts = Counter(keys_of(per_rank[0]) + keys_of(per_rank[1]))
    if drop_last:
        assert max(counts.values()) == 1 and len(counts) == 144
    else:
        assert len(counts) == 150 and sum(counts.values()) == 160  # 10 padded repeats < one global batch


def test_deterministic_and_layout_independent_augmentation(small_shards):
    a = run(ShardStream(small_shards, cfg(), rank=0, world_size=1))
    b = run(ShardStream(small_shards, cfg(), rank=0, world_size=1))
    assert all(torch.equal(x1, x2) and k1 == k2 for (x1, _, k1), (x2, _, k2) in zip(a, b))
    # per-sample randomness comes from (seed, epoch, key): the same key gives the same pixels in another layout
    img = {k: x[i] for x, _, ks in a for i, k in enumerate(ks)}
    # loader workers hand batches over through reused shared-memory slots: a tight prefetch stresses reuse
    other = run(ShardStream(small_shards, cfg(num_workers=2, batch_size=5, prefetch_factor=1), rank=1, world_size=2))
    for x, _, ks in other:
        for i, k in enumerate(ks):
            if k in img:
                assert torch.equal(img[k], x[i])
    c = run(ShardStream(small_shards, cfg(seed=1), rank=0, world_size=1))
    assert keys_of(c) != keys_of(a)


def test_one_loader_worker_equals_in_process(small_shards):
    a = run(ShardStream(small_shards, cfg(), rank=0, world_size=2))
    b = run(ShardStream(small_shards, cfg(num_workers=1), rank=0, world_size=2))
    assert len(a) == len(b) and all(torch.equal(x1, x2) and k1 == k2 for (x1, _, k1), (x2, _, k2) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_identical(small_shards, workers):
    c = cfg(num_workers=workers)
    full = run(ShardStream(small_shards, c, rank=1, world_size=2))
    s = ShardStream(small_shards, c, rank=1, world_size=2)
    head = run(s, 3)
    state = json.loads(json.dumps(s.state_dict()))  # goes through a checkpoint as plain JSON
    s2 = ShardStream(small_shards, c, rank=1, world_size=2)
    s2.load_state_dict(state)
    s2.set_epoch(0)  # a trainer calling set_epoch after load must not rewind
    tail = run(s2)
    assert len(head) + len(tail) == len(full)
    for (x1, y1, k1), (x2, y2, k2) in zip(full, head + tail):
        assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert s2.epoch == 1 and s2.state_dict()["segment"][-1] == 0


def test_elastic_resume_two_to_three_ranks(small_shards):
    c = cfg(drop_last=False, batch_size=6)
    seen, states = [], []
    for r in range(2):
        s = ShardStream(small_shards, c, rank=r, world_size=2)
        seen += keys_of(run(s, 4))
        states.append(s.state_dict())
    assert states[0] == states[1]  # the resume state is global: any rank's copy works
    for r in range(3):
        s = ShardStream(small_shards, cfg(drop_last=False, batch_size=6, num_workers=2), rank=r, world_size=3)
        s.load_state_dict(states[0])
        seen += keys_of(run(s))
        assert s.epoch == 1
    counts = Counter(seen)
    assert len(counts) == 150 and sum(counts.values()) - 150 < 3 * 6


def test_epochs_reshuffle_shards_and_samples(small_shards):
    s = ShardStream(small_shards, cfg(), rank=0, world_size=2)
    e0 = keys_of(run(s))
    assert s.epoch == 1
    e1 = keys_of(run(s))
    assert e0 != e1 and s.epoch == 2
    s.set_epoch(0)
    assert keys_of(run(s)) == e0


def test_eval_order_and_center_crop(small_shards):
    from vitpipe.pipeline import ImageTransform

    m = Manifest.load(small_shards)
    s = ShardStream(m, cfg(train=False, shuffle=False, drop_last=False, batch_size=10), rank=0, world_size=1)
    x, _, keys = run(s, 1)[0]
    members = dict(iter_tar(fsspec.open(m.url(0), "rb").open().read()))
    tf = ImageTransform(img_size=16, train=False)
    first = [n.split(".")[0] for n in members if n.endswith(".jpg")][:10]
    assert keys == first
    assert torch.allclose(x[0], tf(members[keys[0] + ".jpg"]))


def test_corrupt_samples_and_truncated_shards_are_skipped(tmp_path, small_shards):
    src = small_shards.replace("file://", "")
    shutil.copytree(src, tmp_path / "s")
    m = Manifest.load(str(tmp_path / "s"))
    # corrupt one sample's JPEG bytes in place (same length: the tar stays valid)
    p = tmp_path / "s" / m.shards[0].name
    raw = bytearray(p.read_bytes())
    start = raw.index(b"\xff\xd8\xff")
    raw[start + 2 : start + 400] = b"\x00" * 398
    p.write_bytes(bytes(raw))
    # truncate another shard in the middle
    q = tmp_path / "s" / m.shards[3].name
    q.write_bytes(q.read_bytes()[: q.stat().st_size // 2])
    runs = []
    for r in range(2):
        s = ShardStream(str(tmp_path / "s"), cfg(drop_last=False), rank=r, world_size=2)
        runs.append((len(run(s)), s.stats))
    assert runs[0][0] == runs[1][0] == 10  # equal batch counts despite the damage
    assert sum(st["skipped_corrupt"] for _, st in runs) >= 1 + 11  # the bad JPEG + the lost half shard
    assert sum(st["truncated_shards"] for _, st in runs) >= 1


def test_transient_read_errors_are_retried(small_shards, monkeypatch):
    from fsspec.implementations.local import LocalFileSystem

    orig, calls = LocalFileSystem.cat_file, Counter()

    def flaky(self, path, *a, **kw):
        calls[path] += 1
        if calls[path] == 1:
            raise ConnectionError("simulated network blip")
        return orig(self, path, *a, **kw)

    monkeypatch.setattr(LocalFileSystem, "cat_file", flaky)
    s = ShardStream(small_shards, cfg(), rank=0, world_size=1)
    assert len(run(s)) == 18
    assert s.stats["read_retries"] >= 7 and s.stats["failed_shards"] == 0 and s.stats["skipped_corrupt"] == 0


def test_exclusion_list_is_honoured(tmp_path, small_shards):
    m = Manifest.load(small_shards)
    in_shard0 = [n.split(".")[0] for n in dict(iter_tar(fsspec.open(m.url(0), "rb").open().read()))
                 if n.endswith(".jpg")]
    drop = {m.shards[0].name: in_shard0[3:8]}
    (tmp_path / "excl.json").write_text(json.dumps({"exclude": drop}))
    s = ShardStream(m, cfg(drop_last=False, batch_size=1, exclude=str(tmp_path / "excl.json")), 0, 1)
    got = keys_of(run(s))
    assert len(got) == len(set(got)) == 145 and not set(got) & set(drop[m.shards[0].name])
    assert s.stats["skipped_corrupt"] == 0
    m2 = m.with_exclusions(drop)
    assert ShardStream(m2, cfg(batch_size=1), 0, 1).batches_per_epoch() == 145
    with pytest.raises(ValueError, match="not in this manifest"):
        m.with_exclusions({"nope.tar": ["k"]})


def test_multi_label_stream(tmp_path, jpeg_bytes):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(12):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
        rows.append(f"{i}.jpg\t{'x,y' if i % 3 == 0 else 'z'}")
    (tmp_path / "l.tsv").write_text("\n".join(rows))
    m = ingest(str(tmp_path / "l.tsv"), str(tmp_path / "o"), IngestConfig(num_workers=0))
    x, y, _ = run(ShardStream(m, cfg(batch_size=12), 0, 1))[0]
    assert y.shape == (12, 3) and y.dtype == torch.float32
    assert sorted(y.sum(1).tolist()) == [1.0] * 8 + [2.0] * 4


def test_prelaunch_checks(small_shards, caplog):
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        ShardStream(small_shards, cfg(batch_size=100), rank=0, world_size=2)
    s = ShardStream(small_shards, cfg(batch_size=2, num_workers=2), rank=0, world_size=4)
    info = s.check()
    assert info["shards"] == 7 and info["streams"] == 8 and "streams share shards" in caplog.text
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({**s.state_dict(), "seed": 5})


def test_verify_skips_a_shard_whose_sha256_changed(tmp_path, small_shards):
    """With `verify`, a shard altered since ingest is treated like an unreadable one, even when its tar is still
    valid (here: one label changed); without it, the altered sample is served."""
    import tarfile

    from vitpipe.pipeline.order import Segment
    from vitpipe.pipeline.reader import BatchReader, ShardCache, StartPoint

    shutil.copytree(small_shards.replace("file://", ""), tmp_path / "s")
    m = Manifest.load(str(tmp_path / "s"))
    p = tmp_path / "s" / m.shards[2].name
    with tarfile.open(p) as tf:
        member = next(t for t in tf.getmembers() if t.name.endswith(".cls"))
    key, raw = member.name.split(".")[0], bytearray(p.read_bytes())
    label = int(raw[member.offset_data : member.offset_data + member.size])
    raw[member.offset_data : member.offset_data + member.size] = str((label + 1) % 3).encode()
    p.write_bytes(bytes(raw))  # same size, header untouched: still a valid tar
    urls, sha = [m.url(s) for s in m.shards], [s.sha256 for s in m.shards]
    trusting = ShardCache(urls, {}, cfg(), capacity=4)
    assert {k: lab for k, _, lab in trusting.get(2)}[key] == (label + 1) % 3
    checking = ShardCache(urls, {}, cfg(verify=True), capacity=4, sha256=sha)
    assert checking.get(2) == [] and checking.stats["failed_shards"] == 1
    assert len(checking.get(1)) == m.shards[1].num_samples and checking.stats["failed_shards"] == 1
    with pytest.raises(ValueError, match="verify needs the manifest's sha256"):
        ShardCache(urls, {}, cfg(verify=True), capacity=4)
    seg = Segment(world=1, workers=1, batch=8, drop_last=True)
    with pytest.raises(ValueError, match="verify needs the manifest's sha256"):
        BatchReader(urls=urls, counts=np.array([s.num_samples for s in m.shards]), exclude={}, cfg=cfg(verify=True),
                    start=StartPoint(0, (), seg, 0), rank=0, world=1, num_classes=3, multi_label=False)


def test_fixed_epoch_length_cycles_through_the_manifest(small_shards):
    """`epoch_samples=100` over 150 samples: passes continue across epochs, so epochs 0-2 (300 positions) are
    exactly 2 passes - every sample twice - and each epoch has exactly 100."""
    s = ShardStream(small_shards, cfg(epoch_samples=100, drop_last=False, batch_size=10), rank=0, world_size=1)
    assert s.batches_per_epoch() == 10 and s.state_dict()["sources"] == [[150, 100, 0, 0]]
    seen = []
    for e in range(3):
        ks = keys_of(run(s))
        assert len(ks) == 100 and s.epoch == e + 1
        seen += ks
    assert sorted(Counter(seen).values()) == [2] * 150
    assert s.stats["source_samples"] == {"shards": 300}
    plain = ShardStream(small_shards, cfg(), rank=0, world_size=1)
    assert "sources" not in plain.state_dict()  # a plain stream's state keeps its few ints


def test_stream_with_verify_leaves_out_an_altered_shard(tmp_path, small_shards):
    shutil.copytree(small_shards.replace("file://", ""), tmp_path / "s")
    m = Manifest.load(str(tmp_path / "s"))
    p = tmp_path / "s" / m.shards[0].name
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 1  # in the end-of-archive padding: the tar parses exactly as before
    p.write_bytes(bytes(raw))
    altered = {n.split(".")[0] for n, _ in iter_tar(bytes(raw))}
    c = dict(drop_last=False, shuffle=False, batch_size=50)  # 3 batches, each spanning several shards
    plain = ShardStream(str(tmp_path / "s"), cfg(**c))
    assert len(set(keys_of(run(plain)))) == 150 and plain.stats["failed_shards"] == 0
    checked = ShardStream(str(tmp_path / "s"), cfg(**c, verify=True))
    got = keys_of(run(checked))
    assert len(got) == 150 and len(set(got)) == 150 - len(altered) and not set(got) & altered
    assert checked.stats["failed_shards"] == 1 and checked.stats["skipped_corrupt"] == len(altered) == 22
