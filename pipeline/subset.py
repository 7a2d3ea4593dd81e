"""Class-balanced, nested, deterministic subsets of a shard set, chosen at stream time (`StreamConfig.limit`).

Stream time, not ingest time: one ingest and one dedup of the full set serve every point of a data-size sweep, and
the subset is removed before the stream computes its order (as exclusions are), so batch counts, resume and
elastic re-splits hold unchanged.

Selection (`balanced_subset`, pure). Every sample gets a priority: the rank of its shard in a permutation of the
shards seeded by `limit_seed`, then its rank in a seeded permutation of that shard's samples (a seeded
permutation of each class's samples that prefers few shards: since ingest shuffles items across shards, the
first shards of a random shard order are a random sample, and a small subset is read from few shards). Within
each class, samples are ranked by priority (j = 0, 1, ...); the classes are put in a seeded order. All samples are
then sorted by (j, class order) and the subset of size L is the first L of that sequence:
* class-balanced: every class gets L // C, and the L % C classes first in the seeded class order one more; a class
  with fewer samples than its share gives all of them and the shortfall is spread the same way over the classes
  that have more (water-filling). C counts the classes that have samples.
* nested: the sequence does not depend on L, so for one `limit_seed` the 5k subset is inside the 15k subset.
* composes with exclusions: excluded samples are dropped from the sequence before it is cut (priorities are of
  the raw samples), so a dedup hit is replaced by the next sample of its class and the size stays exactly L.
Multi-label sets are balanced by each sample's first (lowest-index) label.

Labels without decoding images: `write_shard` records the keys and (first) labels of a shard's samples, in tar
order, in its `.info.json` sidecar (`"index"`); `read_label_index` reads those sidecars (and, for shards ingested
before the index existed, parses the shard's tar once for its `.cls` / `.labels` members, with a warning).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from .manifest import Manifest, url_to_fs
from .tars import parse_shard
from .shardwriter import sidecar_path

log = logging.getLogger(__name__)


def read_label_index(manifest: Manifest, storage_options: dict | None = None) -> list[tuple[list[str], np.ndarray]]:
    """(keys, first labels int64) of each shard's samples in tar order, from the shard sidecars; shards without a
    valid index (older ingests, or a sidecar that does not describe the manifest's shard) are parsed instead."""
    if not manifest.shards:
        return []
    fs, _ = url_to_fs(manifest.url(0), storage_options)
    paths = [url_to_fs(manifest.url(s), storage_options)[1] for s in manifest.shards]
    sides = [sidecar_path(p) for p in paths]
    try:
        raw = fs.cat(sides, on_error="return")  # concurrent on object stores
    except FileNotFoundError:  # no sidecar at all
        raw = {}
    out, missing = [], 0
    for info, path, side in zip(manifest.shards, paths, sides):
        entry = None
        blob = raw.get(side)
        if isinstance(blob, bytes):
            try:
                meta = json.loads(blob)
                idx = meta.get("index")
                if (idx and meta["info"]["sha256"] == info.sha256 and len(idx["keys"]) == info.num_samples
                        and len(idx["labels"]) == info.num_samples):
                    entry = (list(idx["keys"]), np.asarray(idx["labels"], dtype=np.int64))
            except (ValueError, KeyError, TypeError):
                entry = None
        if entry is None:
            missing += 1
            samples, truncated = parse_shard(fs.cat_file(path), set())
            if truncated or len(samples) != info.num_samples:
                raise ValueError(f"shard {manifest.url(info)} is damaged ({len(samples)} readable samples, manifest "
                                 f"says {info.num_samples}): cannot index its labels for a subset")
            entry = ([k for k, _, _ in samples],
                     np.array([lab if isinstance(lab, int) else min(lab) for _, _, lab in samples], dtype=np.int64))
        out.append(entry)
    if missing:
        log.warning("%d of %d shards of %s have no label index (ingested before it existed?): read their label "
                    "members once instead", missing, len(manifest.shards), manifest.base_url or manifest.source)
    return out


def balanced_subset(labels: list[np.ndarray], limit: int, seed: int, num_classes: int,
                    alive: list[np.ndarray | None] | None = None) -> list[np.ndarray]:
    """Per shard, the sorted indices of the subset's samples among the shard's *alive* samples (those not excluded;
    all when `alive` is None): the first `limit` of the (class rank, class order) sequence, see the module doc."""
    n = np.array([len(x) for x in labels], dtype=np.int64)
    S = len(labels)
    alive = [np.ones(k, dtype=bool) if a is None else np.asarray(a, dtype=bool) for a, k in
             zip(alive or [None] * S, n.tolist())]
    shard_rank = np.empty(S, dtype=np.int64)
    shard_rank[np.random.default_rng([seed, 0x5B5E7]).permutation(S)] = np.arange(S)
    width = int(n.max(initial=1))
    prio = np.concatenate([shard_rank[s] * width + np.random.default_rng([seed, s, 0x5B5E7]).permutation(int(n[s]))
                           for s in range(S)] or [np.zeros(0, np.int64)])
    lab = np.concatenate(labels or [np.zeros(0, np.int64)]).astype(np.int64)
    mask = np.concatenate(alive or [np.zeros(0, bool)])
    sid = np.repeat(np.arange(S, dtype=np.int64), n)
    post = np.concatenate([np.cumsum(a) - 1 for a in alive] or [np.zeros(0, np.int64)])  # index among alive
    lab, prio, sid, post = lab[mask], prio[mask], sid[mask], post[mask]
    if len(lab) and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"label index has class {int(lab.max())} outside the class map of {num_classes} classes")
    if limit > len(lab):
        raise ValueError(f"limit {limit} is more than the {len(lab)} samples available")
    by_class = np.lexsort((prio, lab))
    ls = lab[by_class]
    rank_in_class = np.arange(len(ls)) - np.searchsorted(ls, ls, side="left")
    class_order = np.empty(num_classes, dtype=np.int64)
    class_order[np.random.default_rng([seed, 0xC1A55]).permutation(num_classes)] = np.arange(num_classes)
    seq = rank_in_class * num_classes + class_order[ls]  # unique: (rank, class) pairs
    chosen = by_class[np.argsort(seq, kind="stable")[:limit]]
    chosen = chosen[np.lexsort((post[chosen], sid[chosen]))]
    cuts = np.searchsorted(sid[chosen], np.arange(S + 1))
    return [post[chosen[cuts[s]:cuts[s + 1]]] for s in range(S)]


def select_subset(manifest: Manifest, exclude: dict[int, set[str]], counts: np.ndarray, limit: int, seed: int,
                  storage_options: dict | None = None, what: str = "StreamConfig.limit") -> list[np.ndarray]:
    """`balanced_subset` of a manifest after its exclusions (`exclude`: shard index -> keys; `counts`: samples per
    shard after them). Raises ValueError (naming `what`) when the limit exceeds the samples or the exclusion list
    does not match the shards."""
    index = read_label_index(manifest, storage_options)
    alive: list[np.ndarray | None] = []
    for s, (keys, _) in enumerate(index):
        ex = exclude.get(s)
        if not ex:
            alive.append(None)
            continue
        a = np.fromiter((k not in ex for k in keys), dtype=bool, count=len(keys))
        if int(a.sum()) != int(counts[s]):
            raise ValueError(f"exclusion list does not match shard {manifest.url(s)}: {int(a.sum())} samples left, "
                             f"manifest minus exclusions says {int(counts[s])}")
        alive.append(a)
    try:
        return balanced_subset([lab for _, lab in index], limit, seed, manifest.num_classes, alive)
    except ValueError as e:
        raise ValueError(f"{what}: {e} in {manifest.base_url or manifest.source}") from None
