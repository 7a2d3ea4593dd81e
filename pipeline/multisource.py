"""What a stream reads: one manifest, or a weighted mix of several (`SourceSpec`), resolved into a `StreamPlan`.

A plan holds, for every shard of every source: its URL, its sample count after exclusions, the exclusions and
(with a `limit`) the subset's sample indices; per source: size, epoch quota and label map; and builds the epoch's
`order.MixOrder`. It is plain data (numpy arrays, lists), pickled into the loader workers.

An epoch of a mix has E = `StreamConfig.epoch_samples` positions (None: the sum of the source sizes); source i
gets quota n_i = E * w_i / sum(w) (largest remainder, exact integers) and its samples are drawn without
replacement across epochs (passes continue; `order.MixOrder`), or with `SourceSpec.replacement` uniformly with
replacement within its shuffle blocks. Labels: the mix's class map is the union of the sources' class maps by
name, in source order (a class name in two sources is one class); each source's labels are remapped to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .config import StreamConfig
from .manifest import Manifest, load_exclusions
from .order import MixOrder, apportion
from .subset import select_subset

EPOCH_SAMPLES_MAX = 2**31  # interleave multiplies two indices of an epoch in int64


@dataclass(kw_only=True)
class SourceSpec:
    """One ingested shard set in a weighted mix (the `pretrain.sources` entries)."""

    url: str
    """Manifest URL (folder holding `manifest.json`, or the JSON itself)."""
    weight: float = 1.0
    """Share of the mix: the source gets epoch_samples * weight / sum(weights) positions per epoch."""
    name: str | None = None
    """Name in `stream.stats["source_samples"]` and in sample keys (`name/key`); None: the URL's last folder,
    suffixed `#i` when two sources would share it."""
    replacement: bool = False
    """False: draw without replacement (every sample once per pass, passes continue across epochs); True: each
    draw uniform with replacement within the source's shuffle block (needs `StreamConfig.shuffle`)."""
    limit: int | None = None
    """Class-balanced subset of this source (see `vitpipe.pipeline.subset`), chosen with `StreamConfig.limit_seed`;
    None: all of it."""
    exclude: str | None = None
    """URL of an exclusion list for this source's shards (as `StreamConfig.exclude` for one manifest)."""

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ValueError(f"SourceSpec.url must be a manifest URL, got {self.url!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"SourceSpec.weight must be > 0, got {self.weight}")
        if self.name is not None and (not self.name or "/" in self.name):
            raise ValueError(f"SourceSpec.name must be non-empty without '/', got {self.name!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"SourceSpec.limit must be >= 1, got {self.limit}")


@dataclass(frozen=True)
class SourceInfo:
    """A resolved source of a stream: where its shards sit in the plan, its size and its quota per epoch."""

    name: str
    url: str
    weight: float
    size: int
    """Samples per pass (after exclusions and the subset)."""
    quota: int
    """Positions per epoch."""
    shard_offset: int
    num_shards: int
    replacement: bool = False
    limit: int | None = None


def union_classes(manifests: Sequence[Manifest]) -> list[str]:
    """The class map of a mix: every source's class names, by name, in source order (a name in two sources is one
    class)."""
    index: dict[str, int] = {}
    for m in manifests:
        for c in m.classes:
            index.setdefault(c, len(index))
    return list(index)


def _default_name(url: str, i: int) -> str:
    base = url.rstrip("/")
    if base.endswith(".json"):
        base = base.rsplit("/", 1)[0] if "/" in base else ""
    name = base.rstrip("/").rsplit("/", 1)[-1].replace("/", "_")
    return name or f"source{i}"


class ShardPlan:
    """How positions of an epoch become samples: per-source shard counts, quotas and shard offsets, subset indices
    (`keep`), label maps and key prefixes. `ShardPlan.single(counts)` is a plain stream over bare shard counts;
    `StreamPlan` builds one from manifests."""

    mixed = False
    keep: dict
    label_maps: list
    names: list[str]

    @classmethod
    def single(cls, counts) -> "ShardPlan":
        """One source of these shard counts, no subset, no label map: the plain stream's order."""
        plan = cls.__new__(cls)
        plan.source_counts = [np.asarray(counts, dtype=np.int64)]
        plan.offsets, plan.quotas, plan.replacement = [0], [int(plan.source_counts[0].sum())], [False]
        plan.total, plan.keep, plan.label_maps = plan.quotas[0], {}, [None]
        plan.shard_source = np.zeros(len(plan.source_counts[0]), dtype=np.int64)
        plan.names = ["source0"]
        return plan

    def order(self, seed: int, epoch: int, block: int, shuffle: bool = True) -> MixOrder:
        """The epoch's position -> (shard, index, pass) map."""
        return MixOrder(self.source_counts, self.offsets, self.quotas, seed, epoch, block, shuffle,
                        self.replacement)

    def cache_capacity(self, block: int) -> int:
        """Parsed shards a loader process keeps: the shards one shuffle block of each source can touch (at most
        64 per source: a tiny subset spread over many shards re-reads some instead of holding them all)."""
        cap = 0
        for c in self.source_counts:
            pos = c[c > 0]
            cap += min(-(-block // int(pos.min())) + 2, len(pos), 64) if len(pos) else 0
        return max(2, cap)

    def sample(self, shard: int, idx: int) -> int:
        """Index in the parsed shard (after exclusions) of the stream's sample `idx` of `shard`."""
        keep = self.keep.get(shard)
        return int(keep[idx]) if keep is not None else idx

    def label(self, shard: int, label):
        """A sample's label (int or list) in the plan's class map."""
        m = self.label_maps[int(self.shard_source[shard])]
        if m is None:
            return label
        return int(m[label]) if isinstance(label, int) else [int(m[x]) for x in label]

    def key(self, shard: int, key: str) -> str:
        """The sample key the stream reports (`name/key` in a mix: keys of two sources may collide)."""
        return f"{self.names[int(self.shard_source[shard])]}/{key}" if self.mixed else key


class StreamPlan(ShardPlan):
    """Shards, exclusions, subsets, label maps and quotas of everything a stream reads (see the module doc)."""

    def __init__(self, entries: list[tuple[SourceSpec, Manifest]], cfg: StreamConfig, mixed: bool):
        self.mixed = mixed  # sample keys carry the source name; the resume state records the sources
        self.urls: list[str] = []
        self.sha256: list[str] = []
        self.exclude: dict[int, set[str]] = {}
        self.keep: dict[int, np.ndarray] = {}
        self.manifests = [m for _, m in entries]
        self.classes = union_classes(self.manifests)
        index = {c: i for i, c in enumerate(self.classes)}
        self.multi_label = any(m.multi_label for m in self.manifests)
        shard_counts, order_counts, label_maps, shard_source, specs = [], [], [], [], []
        names = [spec.name or _default_name(spec.url, i) for i, (spec, _) in enumerate(entries)]
        explicit = [spec.name for spec, _ in entries if spec.name]
        if len(set(explicit)) != len(explicit):
            raise ValueError(f"SourceSpec.name values must be unique, got {explicit}")
        seen: set[str] = set()
        for i, (spec, m) in enumerate(entries):
            if spec.name is None and names[i] in seen | set(explicit):
                names[i] = f"{names[i]}#{i}"
            seen.add(names[i])
        for i, (spec, m) in enumerate(entries):
            off = len(self.urls)
            counts, excl = _exclusions(m, spec.exclude, cfg.storage_options)
            keep = None
            if spec.limit is not None:
                what = "StreamConfig.limit" if not mixed else f"SourceSpec.limit of source {names[i]!r}"
                keep = select_subset(m, excl, counts, spec.limit, cfg.limit_seed, cfg.storage_options, what)
            for s, info in enumerate(m.shards):
                self.urls.append(m.url(info))
                self.sha256.append(info.sha256)
                if excl.get(s):
                    self.exclude[off + s] = excl[s]
                if keep is not None:
                    self.keep[off + s] = keep[s]
            shard_counts.append(counts)
            order_counts.append(np.array([len(k) for k in keep], np.int64) if keep is not None else counts)
            remap = np.array([index[c] for c in m.classes], dtype=np.int64)
            label_maps.append(None if np.array_equal(remap, np.arange(len(remap))) else remap)
            shard_source.append(np.full(len(m.shards), i, dtype=np.int64))
            specs.append((spec, names[i], off, int(order_counts[-1].sum())))
        self.shard_counts = np.concatenate(shard_counts) if shard_counts else np.zeros(0, np.int64)
        self.counts = np.concatenate(order_counts) if order_counts else np.zeros(0, np.int64)
        self.source_counts = order_counts
        self.shard_source = np.concatenate(shard_source) if shard_source else np.zeros(0, np.int64)
        self.label_maps = label_maps
        sizes = [size for *_, size in specs]
        for (spec, name, _, size) in specs:
            if size == 0:
                raise ValueError(f"source {name!r} ({spec.url}) has no samples left after exclusions")
        total = cfg.epoch_samples if cfg.epoch_samples is not None else int(sum(sizes))
        if total > EPOCH_SAMPLES_MAX:
            raise ValueError(f"an epoch of {total} samples is more than {EPOCH_SAMPLES_MAX}; set "
                             f"StreamConfig.epoch_samples lower")
        quotas = apportion(total, [spec.weight for spec, *_ in specs])
        self.total = int(total)
        self.sources = [SourceInfo(name=name, url=spec.url, weight=spec.weight, size=size, quota=int(q),
                                   shard_offset=off, num_shards=len(m.shards), replacement=spec.replacement,
                                   limit=spec.limit)
                        for (spec, name, off, size), q, (_, m) in zip(specs, quotas, entries)]
        self.names = [s.name for s in self.sources]
        self.offsets = [s.shard_offset for s in self.sources]
        self.quotas = [s.quota for s in self.sources]
        self.replacement = [s.replacement for s in self.sources]
        self.limit_seed = cfg.limit_seed

    def state(self) -> list[list[int]] | None:
        """What a resume state must agree on beyond the total: per source (size, quota, limit, limit seed)."""
        if not self.mixed and self.sources[0].limit is None and self.sources[0].quota == self.sources[0].size:
            return None
        return [[s.size, s.quota, s.limit or 0, self.limit_seed if s.limit else 0] for s in self.sources]


def _exclusions(m: Manifest, url: str | None, storage_options: dict) -> tuple[np.ndarray, dict[int, set[str]]]:
    """(samples per shard after exclusions, shard index -> excluded keys) of one manifest."""
    exclude = {k: set(v) for k, v in m.exclude.items()}
    if url:
        for k, v in load_exclusions(url, storage_options).items():
            exclude.setdefault(k, set()).update(v)
    names = {s.name: i for i, s in enumerate(m.shards)}
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(f"exclusion list names shards not in the manifest: {unknown[:3]}")
    excl = {names[k]: v for k, v in exclude.items() if v}
    counts = np.array([s.num_samples - len(excl.get(i, ())) for i, s in enumerate(m.shards)], dtype=np.int64)
    if (counts < 0).any():
        raise ValueError("exclusion list removes more samples than a shard holds")
    return counts, excl


SourceLike = Union[SourceSpec, tuple]


def build_plan(data: Manifest | str | Sequence[SourceLike], cfg: StreamConfig) -> StreamPlan:
    """The plan of a stream over one manifest (object or URL; `cfg.exclude` and `cfg.limit` apply) or a list of
    sources (`SourceSpec`, or `(manifest or URL, weight)` tuples; per-source `exclude`/`limit` apply)."""
    if isinstance(data, (Manifest, str)):
        m = data if isinstance(data, Manifest) else Manifest.load(data, cfg.storage_options)
        url = data if isinstance(data, str) else (m.base_url or "source0")
        spec = SourceSpec(url=url, exclude=cfg.exclude, limit=cfg.limit)
        return StreamPlan([(spec, m)], cfg, mixed=False)
    entries = []
    for i, item in enumerate(data):
        if isinstance(item, SourceSpec):
            spec, m = item, None
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            src, weight = item
            m = src if isinstance(src, Manifest) else None
            spec = SourceSpec(url=src if isinstance(src, str) else (src.base_url or f"source{i}"), weight=weight)
        else:
            raise ValueError(f"stream source {i} must be a SourceSpec or a (manifest, weight) pair, got {item!r}")
        entries.append((spec, m if m is not None else Manifest.load(spec.url, cfg.storage_options)))
    if not entries:
        raise ValueError("a stream needs at least one source")
    if cfg.exclude or cfg.limit is not None:
        raise ValueError("StreamConfig.exclude/limit apply to a single manifest; set SourceSpec.exclude/limit per "
                         "source of a mix")
    if not cfg.shuffle and any(spec.replacement for spec, _ in entries):
        raise ValueError("SourceSpec.replacement needs StreamConfig.shuffle=True")
    return StreamPlan(entries, cfg, mixed=len(entries) > 1)
