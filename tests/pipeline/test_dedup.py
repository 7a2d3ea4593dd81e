"""De-duplication against downstream test images, with planted near-duplicates."""

from __future__ import annotations

import shutil

import io

import numpy as np
from PIL import Image

from vitpipe.pipeline import IngestConfig, ImageFolderTask, ShardStream, StreamConfig, dedup, ingest, phash
import pytest

from vitpipe.pipeline.dedup import BandIndex, _brute_pairs, near_pairs


def test_phash_robust_to_reencode_and_resize_not_to_other_images(cifar_dir):
    files = sorted((cifar_dir / "test" / "cat").glob("*.jpg"))[:40]
    dist_same, dist_other = [], []
    hashes = [phash(f.read_bytes()) for f in files]
    for f, h in zip(files, hashes):
        img = Image.open(f).convert("RGB").resize((40, 40), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=70)
        dist_same.append(bin(h ^ phash(buf.getvalue())).count("1"))
    for i in range(len(hashes) - 1):
        dist_other.append(bin(hashes[i] ^ hashes[i + 1]).count("1"))
    assert np.mean(dist_same) < 3 and max(dist_same) <= 6
    assert np.mean(dist_other) > 20


def test_near_pairs_exact():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2**63, 500, dtype=np.int64).astype(np.uint64)
    q = ref[[3, 7, 400]] ^ np.array([0, 0b101, 0b1111111], dtype=np.uint64)
    qi, ri, d = near_pairs(q, ref, max_distance=4, chunk=2)
    assert sorted(zip(qi.tolist(), ri.tolist(), d.tolist())) == [(0, 3, 0), (1, 7, 2)]


@pytest.mark.parametrize("max_distance", [0, 1, 3, 4, 8, 15, 20])
def test_band_index_equals_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    ref = rng.integers(0, 2**63, 4000, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    # queries: exact copies, copies with 1..max_distance+2 flipped bits (some inside, some outside the radius),
    # and unrelated hashes
    picks = rng.choice(len(ref), 300, replace=False)
    q = ref[picks].copy()
    for j in range(len(q)):
        for b in rng.choice(64, rng.integers(0, max_distance + 3), replace=False):
            q[j] ^= np.uint64(1) << np.uint64(b)
    q = np.concatenate([q, rng.integers(0, 2**63, 200, dtype=np.int64).astype(np.uint64)])
    got = BandIndex(q, max_distance).search(ref, chunk=1000)
    want = _brute_pairs(q, ref, max_distance, 97)
    as_set = lambda t: set(zip(*(a.tolist() for a in t)))  # noqa: E731
    assert as_set(got) == as_set(want)
    assert len(got[0]) == len(as_set(got))  # each pair once, however many bands it agrees on
    assert len(want[0]) >= 300 * 0.3  # the test is not vacuous: many planted pairs are inside the radius


def test_band_index_rejects_bad_distance():
    with pytest.raises(ValueError, match="max_distance"):
        BandIndex(np.zeros(3, np.uint64), 65)


def test_dedup_finds_planted_duplicates_and_stream_excludes_them(tmp_path, cifar_dir):
    # downstream task: 60 CIFAR test images (+ a train split the task format needs)
    task_root = tmp_path / "task"
    planted_src = []
    for split, n in (("train", 2), ("test", 6)):
        for c in ("cat", "ship"):
            (task_root / split / c).mkdir(parents=True)
            for f in sorted((cifar_dir / split / c).glob("*.jpg"))[:n * 5]:
                shutil.copyfile(f, task_root / split / c / f.name)
                if split == "test":
                    planted_src.append(f)
    task = ImageFolderTask(str(task_root))
    # pretraining folder: 200 CIFAR train images + 6 test images re-encoded and resized (the "leak")
    pre = tmp_path / "pre"
    for c in ("cat", "ship", "frog", "truck"):
        (pre / c).mkdir(parents=True)
        for f in sorted((cifar_dir / "train" / c).glob("*.jpg"))[100:150]:
            shutil.copyfile(f, pre / c / f.name)
    rng = np.random.default_rng(0)
    planted = []
    for i, f in enumerate(rng.choice(planted_src, 6, replace=False)):
        img = Image.open(f).convert("RGB").resize((36, 36), Image.BICUBIC)
        img.save(pre / f.parent.name / f"leak{i}.jpg", format="JPEG", quality=75)
        planted.append(f"{f.parent.name}_leak{i}")
    m = ingest(str(pre), str(tmp_path / "shards"), IngestConfig(num_workers=2, shard_max_samples=50))
    report = dedup(str(tmp_path / "shards"), task, max_distance=6, num_workers=2)
    found = {k for keys in report.exclude.values() for k in keys}
    assert set(planted) <= found
    assert len(found) <= len(planted) + 3  # near-duplicates only, not half the dataset
    assert report.num_test == task.num_test == 60 and report.num_pretrain == m.num_samples == 206
    url = report.save(str(tmp_path / "dedup.json"))
    s = ShardStream(m, StreamConfig(batch_size=10, img_size=16, exclude=url, drop_last=False), 0, 1)
    seen = [k for _, _, ks in s.iter_batches() for k in ks]
    assert not set(seen) & found and len(set(seen)) == 206 - len(found)
