"""Source -> WebDataset shards + `manifest.json`, in parallel processes, resumable, deterministic.

Composable for cluster fan-out (the Ray variant lives in `vitpipe.jobs`):
    plan = plan_ingest(source, cfg)                       # pure: which item goes to which shard
    results = [write_shard(plan.shard_items(i), plan.shard_url(dest, i), cfg, plan.class_index, plan.multi_label)
               for i in range(plan.num_shards)]          # any executor
    manifest = finalize(plan, dest, results, cfg)         # bad-fraction check, manifest written last (atomic)
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import random
import sys
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from .config import IngestConfig
from .fsio import join_url, url_to_fs
from .manifest import MANIFEST_NAME, Manifest
from .shardwriter import ShardResult, write_shard
from .sources import SourceItem, list_source

log = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """Ingest stopped: too much bad input, or nothing usable in the source."""


@dataclass
class IngestPlan:
    """The deterministic result of planning: usable items, shard membership, class map, bad counts at listing."""

    source: str
    items: list[SourceItem]
    shards: list[list[int]]
    """Item indices per shard, in write order."""
    classes: list[str]
    multi_label: bool
    bad: dict[str, int] = field(default_factory=dict)
    """Items rejected while listing (e.g. "unknown_class", "no_label", "not_image", "symlink_outside_root")."""
    num_listed: int = 0

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def class_index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def shard_items(self, i: int) -> list[SourceItem]:
        return [self.items[j] for j in self.shards[i]]

    @staticmethod
    def shard_name(i: int) -> str:
        return f"shard-{i:06d}.tar"

    def shard_url(self, dest: str, i: int) -> str:
        return join_url(dest, self.shard_name(i))


def plan_shards(
    sizes: list[int], max_samples: int | None, max_bytes: int | None, seed: int, shuffle: bool = True
) -> list[list[int]]:
    """Pure shard plan: shuffle item indices with `seed`, then pack them in order into shards that respect
    `max_samples` and `max_bytes` (an item larger than `max_bytes` gets a shard of its own)."""
    order = list(range(len(sizes)))
    if shuffle:
        random.Random(seed).shuffle(order)  # class-sorted sources must not give class-sorted shards
    shards, cur, cur_bytes = [], [], 0
    for j in order:
        b = -(-max(sizes[j], 0) // 512) * 512 + 2560  # tar: image blocks + headers/blocks of .cls and .json
        full = (max_samples is not None and len(cur) >= max_samples) or (
            max_bytes is not None and cur and cur_bytes + b > max_bytes
        )
        if full:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(j)
        cur_bytes += b
    if cur:
        shards.append(cur)
    return shards


def plan_ingest(source: str, cfg: IngestConfig, storage_options: dict | None = None) -> IngestPlan:
    """List `source`, resolve labels to a class map, apply `limit_per_class`, and plan the shards.

    Entries the listing leaves out for safety (symlinks out of an image folder) count as bad items."""
    bad: Counter = Counter()
    listed, source_classes = list_source(source, cfg.split, storage_options, skipped=bad)
    n_skipped = sum(bad.values())
    if cfg.classes is not None:
        classes = list(cfg.classes)
    elif source_classes is not None:
        classes = list(source_classes)
    else:
        classes = sorted({c for it in listed for c in it.labels})
    known = set(classes)
    items, per_class = [], Counter()
    for it in listed:
        if not it.ext:
            bad["not_image"] += 1
        elif not it.labels:
            bad["no_label"] += 1
        elif any(c not in known for c in it.labels):
            bad["unknown_class"] += 1
        elif cfg.limit_per_class is None or per_class[it.labels[0]] < cfg.limit_per_class:
            per_class[it.labels[0]] += 1
            items.append(it)
    if not items:
        raise IngestError(f"no usable items in {source} (bad at listing: {dict(bad) or 'none'})")
    multi = cfg.multi_label if cfg.multi_label is not None else any(len(it.labels) > 1 for it in items)
    shards = plan_shards([it.size for it in items], cfg.shard_max_samples, cfg.shard_max_bytes, cfg.seed)
    return IngestPlan(source=source, items=items, shards=shards, classes=classes, multi_label=multi,
                      bad=dict(bad), num_listed=len(listed) + n_skipped)


def _check_bad(bad: dict[str, int], total: int, cfg: IngestConfig, where: str) -> None:
    n_bad = sum(bad.values())
    if total and n_bad / total > cfg.max_bad_fraction:
        raise IngestError(
            f"{where}: {n_bad} of {total} items bad ({n_bad / total:.2%} > max_bad_fraction "
            f"{cfg.max_bad_fraction:.2%}): {dict(sorted(bad.items()))}"
        )


def finalize(plan: IngestPlan, dest: str, results: list[ShardResult], cfg: IngestConfig,
             storage_options: dict | None = None) -> Manifest:
    """Check the bad fraction over the whole source, then write `manifest.json` last and atomically."""
    bad = Counter(plan.bad)
    for r in results:
        bad.update(r.bad)
    _check_bad(dict(bad), plan.num_listed, cfg, f"ingest of {plan.source}")
    for reason, n in sorted(bad.items()):
        log.warning("ingest %s: skipped %d item(s): %s", plan.source, n, reason)
    manifest = Manifest(
        shards=[r.info for r in results if r.info.num_samples > 0],
        classes=plan.classes, multi_label=plan.multi_label, source=plan.source,
        options=cfg.to_dict(), bad=dict(sorted(bad.items())),
    )
    manifest.save(dest, storage_options)
    return manifest


_COUNTER = None


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _write_task(args) -> ShardResult:
    items, url, cfg, class_index, multi, so = args
    return write_shard(items, url, cfg, class_index, multi, so, counter=_COUNTER)


def ingest(source: str, dest: str, cfg: IngestConfig | None = None, progress: bool = False,
           storage_options: dict | None = None) -> Manifest:
    """Ingest `source` (image folder, tar/WebDataset, or list file) into shards + manifest under `dest`.

    Shards already complete under `dest` (same plan; sha256 re-checked unless `cfg.verify_reused` is False) are
    reused, so re-running after a crash resumes.
    Raises `IngestError` when more than `cfg.max_bad_fraction` of the items is bad.
    """
    cfg = cfg or IngestConfig()
    t0 = time.perf_counter()
    plan = plan_ingest(source, cfg, storage_options)
    fs, dpath = url_to_fs(dest, storage_options)
    fs.makedirs(dpath, exist_ok=True)
    if fs.exists(join_url(dpath, MANIFEST_NAME)):
        fs.rm(join_url(dpath, MANIFEST_NAME))  # a stale manifest must not describe shards being rewritten
    tasks = [(plan.shard_items(i), plan.shard_url(dest, i), cfg, plan.class_index, plan.multi_label,
              storage_options) for i in range(plan.num_shards)]
    total = len(plan.items)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", unit_scale=True, desc="ingest", file=sys.stderr, smoothing=0.1)
    results: list[ShardResult | None] = [None] * len(tasks)
    if cfg.num_workers <= 1 or len(tasks) == 1:
        for i, t in enumerate(tasks):
            results[i] = write_shard(*t)
            if bar:
                bar.update(len(t[0]))
            _abort_if_hopeless(plan, results, cfg)
    else:
        # spawn, not fork: a driver that already runs Ray / MLflow threads can deadlock in a forked child; and not
        # forkserver, whose server keeps the environment of its first use (credentials set later would be missing)
        # ProcessPoolExecutor, not mp.Pool: a worker that dies (OOM killer, a crash at start-up) breaks the pool
        # with BrokenProcessPool instead of being replaced forever while its task waits.
        ctx = mp.get_context("spawn")
        counter = ctx.Value("q", 0)
        workers = min(cfg.num_workers, len(tasks))
        try:
            with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(counter,)) as pool:
                pending = {pool.submit(_write_task, t): i for i, t in enumerate(tasks)}
                seen = 0
                while pending:
                    done, _ = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                    for fut in done:
                        results[pending.pop(fut)] = fut.result()  # re-raises a worker's error with its traceback
                    try:
                        _abort_if_hopeless(plan, results, cfg)
                    except IngestError:
                        pool.shutdown(wait=False, cancel_futures=True)
                        raise
                    if bar:
                        bar.update(counter.value - seen)
                        seen = counter.value
        except BrokenProcessPool as e:
            raise IngestError(f"ingest of {source}: a worker process died ({e}); finished shards are kept, "
                              "re-run to resume (workers are spawned: a script calling ingest() needs an "
                              "`if __name__ == '__main__':` guard)") from e
    if bar:
        bar.close()
    manifest = finalize(plan, dest, results, cfg, storage_options)
    reused = sum(r.reused for r in results)
    log.info("ingest %s -> %s: %d samples in %d shards (%d reused) in %.1fs", source, dest,
             manifest.num_samples, len(manifest.shards), reused, time.perf_counter() - t0)
    return manifest


def _abort_if_hopeless(plan: IngestPlan, results: list, cfg: IngestConfig) -> None:
    """Stop early once the bad items already seen exceed the allowed fraction of the whole source."""
    bad = Counter(plan.bad)
    for r in results:
        if r is not None:
            bad.update(r.bad)
    _check_bad(dict(bad), plan.num_listed, cfg, f"ingest of {plan.source}")
