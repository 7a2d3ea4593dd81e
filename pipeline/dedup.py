"""De-duplicate pretraining shards against downstream test sets with a DCT perceptual hash (pHash).

The ViT paper de-duplicated JFT/ImageNet-21k against its downstream test sets (§4.1). Here: 64-bit pHash of
every pretraining sample and every test image, pairs within `max_distance` Hamming bits are near-duplicates; the
report lists them and yields an exclusion list (`{shard name: [keys]}`) that `ShardStream` honours through
`StreamConfig.exclude` or `Manifest.with_exclusions`. The hash survives re-encoding, resizing and small crops;
it does not catch flips or heavy crops (by design: those are different views, not leaked test images).
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing as mp
import sys
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.fft import dctn

from .manifest import Manifest, url_to_fs, write_atomic
from .reader import parse_shard

log = logging.getLogger(__name__)

_BITS = 1 << np.arange(64, dtype=np.uint64)


def phash(image: Image.Image | bytes) -> int:
    """64-bit DCT perceptual hash: 32x32 grayscale, 2-D DCT-II, top-left 8x8 low frequencies vs their median
    (DC excluded from the median), one bit each."""
    img = image if isinstance(image, Image.Image) else Image.open(io.BytesIO(image))
    if img.format == "JPEG" and getattr(img, "tile", None):
        img.draft("L", (64, 64))  # the hash only looks at 32x32: decode big JPEGs at reduced scale
    g = np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    low = dctn(g, type=2, norm="ortho")[:8, :8].reshape(-1)
    bits = low > np.median(low[1:])
    return int((_BITS[bits]).sum())


def hash_images(images) -> np.ndarray:
    """uint64 pHashes of an iterable of PIL images or encoded bytes."""
    return np.array([phash(im) for im in images], dtype=np.uint64)


def _hash_shard(args) -> tuple[list[str], np.ndarray, int]:
    url, storage_options = args
    fs, path = url_to_fs(url, storage_options, fresh=True)
    samples, _ = parse_shard(fs.cat_file(path), set())
    keys, hashes, bad = [], [], 0
    for key, data, _label in samples:
        try:
            hashes.append(phash(data))
            keys.append(key)
        except (OSError, ValueError, SyntaxError):
            bad += 1
    return keys, np.array(hashes, dtype=np.uint64), bad


def hash_manifest(manifest: Manifest, num_workers: int = 2, storage_options: dict | None = None):
    """(shard index per sample, keys, hashes) of every sample in the manifest's shards (processes in parallel)."""
    tasks = [(manifest.url(s), storage_options) for s in manifest.shards]
    if num_workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        with ctx.Pool(min(num_workers, len(tasks))) as pool:
            results = pool.map(_hash_shard, tasks)
    else:
        results = [_hash_shard(t) for t in tasks]
    shard_idx = np.concatenate([np.full(len(k), i) for i, (k, _, _) in enumerate(results)]).astype(np.int64)
    keys = [k for ks, _, _ in results for k in ks]
    hashes = np.concatenate([h for _, h, _ in results]) if results else np.zeros(0, np.uint64)
    return shard_idx, keys, hashes


def near_pairs(query: np.ndarray, ref: np.ndarray, max_distance: int, chunk: int = 2048):
    """(query index, ref index, Hamming distance) of all pairs within `max_distance`, by chunked XOR + popcount
    (exact; O(|query| x |ref|) popcounts, ~1e9/s here - a multi-index hash would replace it at JFT scale)."""
    qi, ri, dist = [], [], []
    for s in range(0, len(query), chunk):
        d = np.bitwise_count(query[s : s + chunk, None] ^ ref[None, :])
        a, b = np.nonzero(d <= max_distance)
        qi.append(a + s)
        ri.append(b)
        dist.append(d[a, b])
    if not qi:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)
    return np.concatenate(qi), np.concatenate(ri), np.concatenate(dist)


@dataclass
class DedupReport:
    """Near-duplicates found: one row per (test image, pretraining sample) pair, and the exclusion list."""

    max_distance: int
    num_pretrain: int
    num_test: int
    matches: list[dict] = field(default_factory=list)
    exclude: dict[str, list[str]] = field(default_factory=dict)

    @property
    def num_excluded(self) -> int:
        return sum(len(v) for v in self.exclude.values())

    def to_dict(self) -> dict:
        return {"max_distance": self.max_distance, "num_pretrain": self.num_pretrain, "num_test": self.num_test,
                "num_excluded": self.num_excluded, "matches": self.matches, "exclude": self.exclude}

    def save(self, url: str, storage_options: dict | None = None) -> str:
        """Write the report JSON (usable directly as `StreamConfig.exclude`)."""
        fs, path = url_to_fs(url, storage_options)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.makedirs(parent, exist_ok=True)
        write_atomic(fs, path, json.dumps(self.to_dict(), indent=1).encode())
        return url


def dedup(manifest: Manifest | str, tasks, max_distance: int = 4, split: str = "test", num_workers: int = 2,
          storage_options: dict | None = None) -> DedupReport:
    """Find pretraining samples that are near-duplicates of any image of `split` in `tasks` (one task or a list).

    A task is anything with `name`, `num_train`/`num_test` and `load(split, indices)` (see `vitpipe.pipeline.tasks`).
    """
    if not 0 <= max_distance <= 64:
        raise ValueError(f"dedup max_distance must be in [0, 64] bits, got {max_distance}")
    man = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest, storage_options)
    tasks = tasks if isinstance(tasks, (list, tuple)) else [tasks]
    shard_idx, keys, ref = hash_manifest(man, num_workers, storage_options)
    report = DedupReport(max_distance=max_distance, num_pretrain=len(keys), num_test=0)
    excluded: dict[str, set[str]] = {}
    for task in tasks:
        n = task.num_test if split == "test" else task.num_train
        q = np.concatenate([hash_images(task.load(split, np.arange(s, min(n, s + 512))))
                            for s in range(0, n, 512)]) if n else np.zeros(0, np.uint64)
        report.num_test += n
        qi, ri, dist = near_pairs(q, ref, max_distance)
        for a, b, d in zip(qi.tolist(), ri.tolist(), dist.tolist()):
            shard = man.shards[shard_idx[b]].name
            report.matches.append({"task": task.name, "split": split, "index": a, "shard": shard,
                                   "key": keys[b], "distance": d})
            excluded.setdefault(shard, set()).add(keys[b])
    report.exclude = {k: sorted(v) for k, v in sorted(excluded.items())}
    log.info("dedup: %d pretraining samples near-duplicate %d test images (<= %d bits) -> excluded",
             report.num_excluded, len({(m["task"], m["index"]) for m in report.matches}), max_distance)
    return report
