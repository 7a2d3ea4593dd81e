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
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.fft import dctn

from .manifest import Manifest, url_to_fs, write_atomic
from .tars import parse_shard

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


class BandIndex:
    """Multi-index hashing over a (small) set of hashes: exact Hamming search within `max_distance` bits.

    The 64 bits are cut into `max_distance + 1` disjoint bands; by pigeonhole, two hashes within `max_distance`
    bits agree exactly on at least one band. Each band's values are sorted once, a lookup is a `searchsorted` per
    band, and only those candidates get a popcount. The index is built over the downstream test images (thousands)
    and the pretraining hashes (hundreds of millions at JFT scale) stream through it shard by shard, so work is
    ~linear in the pretraining set instead of |test| x |pretrain| popcounts, and nothing of it stays in memory.
    """

    def __init__(self, hashes: np.ndarray, max_distance: int):
        if not 0 <= max_distance <= 64:
            raise ValueError(f"dedup max_distance must be in [0, 64] bits, got {max_distance}")
        self.hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
        self.max_distance = max_distance
        nb = max_distance + 1
        # beyond ~16 bands a band has < 4 bits and every hash is a candidate: brute force is then cheaper
        self.bounds = [(64 * b // nb, 64 * (b + 1) // nb) for b in range(nb)] if nb <= 16 else []
        self.bands = []
        for lo, hi in self.bounds:
            v = self._band(self.hashes, lo, hi)
            order = np.argsort(v, kind="stable")
            self.bands.append((v[order], order))

    @staticmethod
    def _band(h: np.ndarray, lo: int, hi: int) -> np.ndarray:
        return (h >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)

    def search(self, ref: np.ndarray, chunk: int = 2048):
        """(index into the indexed hashes, index into `ref`, distance) of every pair within `max_distance`."""
        ref = np.asarray(ref, dtype=np.uint64)
        if not self.bounds:
            return _brute_pairs(self.hashes, ref, self.max_distance, chunk)
        qs, rs = [], []
        for (lo, hi), (sv, order) in zip(self.bounds, self.bands):
            v = self._band(ref, lo, hi)
            a, b = np.searchsorted(sv, v, "left"), np.searchsorted(sv, v, "right")
            n = b - a
            if not n.any():
                continue
            r = np.repeat(np.arange(len(ref)), n)
            # positions a[r] .. b[r]-1 in the sorted band, flattened
            pos = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(a, n)
            qs.append(order[pos])
            rs.append(r)
        if not qs:
            return _empty_pairs()
        q, r = np.concatenate(qs), np.concatenate(rs)
        d = np.bitwise_count(self.hashes[q] ^ ref[r])
        keep = d <= self.max_distance
        q, r, d = q[keep], r[keep], d[keep]
        # a pair agreeing on several bands was found several times
        uniq = np.unique(r.astype(np.int64) * len(self.hashes) + q, return_index=True)[1]
        return q[uniq].astype(np.int64), r[uniq].astype(np.int64), d[uniq].astype(np.uint8)


def _empty_pairs():
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8)


def _brute_pairs(query: np.ndarray, ref: np.ndarray, max_distance: int, chunk: int):
    qi, ri, dist = [], [], []
    for s in range(0, len(query), chunk):
        d = np.bitwise_count(query[s : s + chunk, None] ^ ref[None, :])
        a, b = np.nonzero(d <= max_distance)
        qi.append(a + s)
        ri.append(b)
        dist.append(d[a, b])
    if not qi:
        return _empty_pairs()
    return np.concatenate(qi), np.concatenate(ri), np.concatenate(dist).astype(np.uint8)


def near_pairs(query: np.ndarray, ref: np.ndarray, max_distance: int, chunk: int = 2048):
    """(query index, ref index, Hamming distance) of all pairs within `max_distance` (exact; a band index over
    `query`, see `BandIndex`)."""
    qi, ri, d = BandIndex(query, max_distance).search(ref, chunk)
    order = np.lexsort((ri, qi))
    return qi[order], ri[order], d[order]


_INDEX: BandIndex | None = None  # a pool worker's copy of the test-hash index, sent once (see match_manifest)


def _set_index(index: BandIndex) -> None:
    global _INDEX
    _INDEX = index


def _match_shard(args) -> tuple[int, list[tuple[int, str, int]], int]:
    """Hash one pretraining shard and match it against the worker's index: (samples hashed, [(test idx, key,
    dist)], bad)."""
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
    qi, ri, d = _INDEX.search(np.array(hashes, dtype=np.uint64))
    return len(keys), [(q, keys[r], dd) for q, r, dd in zip(qi.tolist(), ri.tolist(), d.tolist())], bad


def match_manifest(manifest: Manifest, index: BandIndex, num_workers: int = 2,
                   storage_options: dict | None = None):
    """Per shard, in manifest order: (samples hashed, matches, bad) - shards hashed in parallel processes, each
    returning only its matches; the index goes to each worker once, not with every shard."""
    tasks = [(manifest.url(s), storage_options) for s in manifest.shards]
    if num_workers > 1 and len(tasks) > 1:
        # spawn: the dedup stage runs in a driver with Ray / MLflow threads, which a forked child can deadlock on
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(num_workers, len(tasks)), mp_context=ctx, initializer=_set_index,
                                 initargs=(index,)) as pool:
            return list(pool.map(_match_shard, tasks, chunksize=max(1, len(tasks) // (8 * num_workers))))
    _set_index(index)
    return [_match_shard(t) for t in tasks]


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
    queries, owners = [], []
    for task in tasks:
        n = task.num_test if split == "test" else task.num_train
        for s in range(0, n, 512):
            queries.append(hash_images(task.load(split, np.arange(s, min(n, s + 512)))))
        owners += [(task.name, i) for i in range(n)]
    index = BandIndex(np.concatenate(queries) if queries else np.zeros(0, np.uint64), max_distance)
    report = DedupReport(max_distance=max_distance, num_pretrain=0, num_test=len(owners))
    excluded: dict[str, set[str]] = {}
    for shard, (n_hashed, matches, _bad) in zip(man.shards, match_manifest(man, index, num_workers,
                                                                            storage_options)):
        report.num_pretrain += n_hashed
        for q, key, d in matches:
            name, i = owners[q]
            report.matches.append({"task": name, "split": split, "index": i, "shard": shard.name,
                                   "key": key, "distance": d})
            excluded.setdefault(shard.name, set()).add(key)
    report.matches.sort(key=lambda m: (m["task"], m["index"], m["shard"], m["key"]))
    report.exclude = {k: sorted(v) for k, v in sorted(excluded.items())}
    log.info("dedup: %d pretraining samples near-duplicate %d test images (<= %d bits) -> excluded",
             report.num_excluded, len({(m["task"], m["index"]) for m in report.matches}), max_distance)
    return report
