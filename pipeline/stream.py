"""`ShardStream`: the per-rank iterable of training/eval batches over a manifest's shards, or a weighted mix of
several manifests (`multisource`), optionally a class-balanced subset (`subset`).

Deterministic (order and augmentation from seed, epoch, key), equal batch counts on every rank, exactly-once per
epoch up to documented padding, mid-epoch resumable from a few ints, elastic across world sizes (see `order`).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from .config import StreamConfig
from .manifest import Manifest
from .multisource import SourceSpec, build_plan
from .order import Seq, Segment, next_phase, segment_sequence, use_sequence
from .reader import BatchReader, StartPoint, no_convert

log = logging.getLogger(__name__)


class ShardStream:
    """Batches `(images (B,3,H,W) float32, labels)` for one rank; labels int64 (B,) or multi-hot float (B, C).

    `manifest`: one manifest (object or URL; `cfg.exclude` and `cfg.limit` apply), or a list of sources of a
    weighted mix: `SourceSpec`s or `(manifest or URL, weight)` pairs (epoch length `cfg.epoch_samples`; see
    `multisource`). Iterating runs the rest of the current epoch, then advances to the next epoch; `set_epoch(e)`
    jumps to the start of epoch e (a no-op when already in e, so it is safe after `load_state_dict`). `state_dict()`
    after k batches resumes at batch k+1, also with another world size / worker count (the unseen samples are
    re-split). `stats["source_samples"]` counts the samples delivered per source name.
    """

    def __init__(self, manifest: Manifest | str | list[SourceSpec | tuple], cfg: StreamConfig | None = None,
                 rank: int = 0, world_size: int = 1):
        self.cfg = cfg or StreamConfig()
        if not 0 <= rank < world_size:
            raise ValueError(f"ShardStream: rank {rank} outside world_size {world_size}")
        self.plan = build_plan(manifest, self.cfg)
        self.manifest = self.plan.manifests[0] if len(self.plan.manifests) == 1 else None  # None for a mix
        self.sources, self.classes = self.plan.sources, self.plan.classes
        self.num_classes, self.multi_label = len(self.plan.classes), self.plan.multi_label
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, self.cfg.num_workers)
        self._exclude = self.plan.exclude
        self.counts = self.plan.counts  # samples per shard in the stream (after exclusions and subsets)
        self.total = self.plan.total  # positions per epoch
        self.urls = self.plan.urls
        self._epoch, self._history, self._consumed = 0, [], 0
        self._segment = self._fresh_segment()
        self._live = None  # [batch iterator, StartPoint it continues from]
        self._ring = None  # shared-memory batch slots of the live loader
        self.stats = {"samples": 0, "batches": 0, "skipped_corrupt": 0, "wait_s": 0.0, "last_wait_s": 0.0,
                      "read_retries": 0, "failed_shards": 0, "truncated_shards": 0,
                      "source_samples": {s.name: 0 for s in self.sources}}
        self.check()

    # ----- layout -----
    def _fresh_segment(self) -> Segment:
        return Segment(world=self.world_size, workers=self.workers, batch=self.cfg.batch_size,
                       drop_last=self.cfg.drop_last)

    def _layout(self) -> tuple[Seq, int]:
        R = segment_sequence(self.total, self._history)
        used, T, _ = use_sequence(R, self.world_size, self.cfg.batch_size, self.cfg.drop_last)
        return used, T

    def batches_per_epoch(self) -> int:
        """Batches per rank in a full epoch with this layout; identical on every rank."""
        return use_sequence(Seq.range(self.total), self.world_size, self.cfg.batch_size, self.cfg.drop_last)[1]

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def remaining_batches(self) -> int:
        """Batches left in the current epoch on this rank (after a resume: of the current segment)."""
        return self._layout()[1] - self._consumed

    @property
    def epoch(self) -> int:
        return self._epoch

    def check(self) -> dict:
        """Pre-launch check: raises when an epoch would have no batch; warns when shards < ranks x workers (the
        streams then share shards - correct, but each such shard is read by several streams)."""
        T = self.batches_per_epoch()
        gb = self.world_size * self.cfg.batch_size
        if T == 0:
            raise ValueError(f"{self.total} samples cannot fill one global batch of {gb} "
                             f"(world {self.world_size} x batch {self.cfg.batch_size}); lower batch_size or set "
                             f"drop_last=False")
        streams = self.world_size * self.workers
        n_shards = int((self.counts > 0).sum())
        if n_shards < streams:
            log.warning("%d shards for %d ranks x %d workers: streams share shards (each read by up to %d "
                        "streams); re-ingest with smaller shards for full read parallelism",
                        n_shards, self.world_size, self.workers, -(-streams // max(1, n_shards)) + 1)
        pad = 0 if self.cfg.drop_last else T * gb - self.total
        dropped = self.total - T * gb if self.cfg.drop_last else 0
        return {"batches_per_epoch": T, "padding": pad, "dropped": dropped, "shards": n_shards, "streams": streams}

    def set_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._history, self._consumed = epoch, [], 0
            self._segment = self._fresh_segment()

    # ----- resume -----
    def state_dict(self) -> dict:
        """A few ints: epoch, seed, samples in the manifest, and the (usually single) layout segment(s)."""
        seg = Segment(**{**self._segment.__dict__, "consumed": self._consumed})
        state = {"epoch": self._epoch, "seed": self.cfg.seed, "total": self.total,
                 "segment": seg.to_list(), "history": [s.to_list() for s in self._history]}
        if self.plan.state() is not None:  # a mix, a subset or a fixed epoch length: per source [size, quota, ...]
            state["sources"] = self.plan.state()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.cfg.seed:
            raise ValueError(f"stream state has seed {state['seed']}, this stream seed {self.cfg.seed}")
        if state["total"] != self.total:
            raise ValueError(f"stream state is for {state['total']} samples, this manifest has {self.total}")
        if state.get("sources") != self.plan.state():
            raise ValueError(f"stream state is for sources [size, quota, limit, limit_seed] {state.get('sources')}, "
                             f"this stream has {self.plan.state()} (weights, epoch_samples or limits changed)")
        self._epoch = int(state["epoch"])
        self._history = [Segment.from_list(s) for s in state["history"]]
        prev = Segment.from_list(state["segment"])
        mine = self._fresh_segment()
        if (prev.world, prev.workers, prev.batch, prev.drop_last) == (mine.world, mine.workers, mine.batch,
                                                                      mine.drop_last):
            self._segment, self._consumed = Segment(**{**prev.__dict__, "consumed": 0}), prev.consumed
        else:  # elastic: close the old layout; the unseen samples are re-split under the new one
            self._history.append(prev)
            self._segment = Segment(**{**mine.__dict__, "phase": next_phase(prev, self.workers)})
            self._consumed = 0

    # ----- iteration -----
    def _start_point(self) -> StartPoint:
        return StartPoint(epoch=self._epoch, history=tuple(self._history), segment=self._segment,
                          consumed=self._consumed)

    def _loader(self):
        """The live batch iterator, reused while the stream continues where it stopped (workers keep prefetching
        across epochs); rebuilt after `set_epoch` jumps or `load_state_dict`."""
        here = self._start_point()
        if self._live is not None and self._live[1] == here:
            return self._live[0]
        self.close()
        c = self.cfg
        ring = None
        if c.num_workers > 0:
            ring = torch.empty((c.num_workers, c.prefetch_factor + 2, c.batch_size, 3, c.img_size, c.img_size),
                               dtype=torch.float32).share_memory_()
        self._ring = ring
        reader = BatchReader(urls=self.urls, counts=self.plan.shard_counts, exclude=self._exclude, cfg=self.cfg,
                             start=here, rank=self.rank, world=self.world_size, num_classes=self.num_classes,
                             multi_label=self.multi_label, ring=ring, sha256=self.plan.sha256, plan=self.plan)
        if self.cfg.num_workers > 0:
            it = iter(torch.utils.data.DataLoader(
                reader, batch_size=None, collate_fn=no_convert, num_workers=self.cfg.num_workers,
                pin_memory=self.cfg.pin_memory, prefetch_factor=self.cfg.prefetch_factor))
        else:
            it = iter(reader)
        self._live = [it, here]
        return it

    def close(self) -> None:
        """Stop loader workers (also happens when the stream is garbage-collected)."""
        if self._live is not None:
            it = self._live[0]
            self._live = None
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
            elif hasattr(it, "close"):
                it.close()

    def _labels(self, raw) -> torch.Tensor:
        """int64 (B,) from a numpy array, or a multi-hot float (B, C) from per-sample label lists."""
        if not self.multi_label:
            return torch.as_tensor(np.asarray(raw), dtype=torch.int64)
        rows = np.repeat(np.arange(len(raw)), [len(r) for r in raw])
        y = torch.zeros(len(raw), self.num_classes)
        y[torch.from_numpy(rows), torch.as_tensor([c for r in raw for c in r], dtype=torch.int64)] = 1.0
        return y

    def __iter__(self):
        return self.iter_batches(with_keys=False)

    def iter_batches(self, with_keys: bool = True):
        """Like iterating the stream (the rest of the current epoch), yielding (images, labels, keys) - keys
        identify samples (tests, audits) - or (images, labels) with `with_keys=False`."""
        used, T = self._layout()
        it = self._loader()
        while self._consumed < T:
            t0 = time.perf_counter()
            images, labels, keys, n_bad, io_stats = next(it)
            if isinstance(images, (tuple, list)):  # a shared-memory slot: copy out before the worker reuses it
                src = self._ring[tuple(images)].numpy()
                if self.cfg.pin_memory:
                    images = torch.empty(src.shape, dtype=torch.float32, pin_memory=True)
                    np.copyto(images.numpy(), src)  # numpy: no intra-op thread contention with the trainer
                else:
                    images = torch.from_numpy(src.copy())
            elif self.cfg.pin_memory:
                images = images.pin_memory()
            labels = self._labels(labels)
            wait = time.perf_counter() - t0
            st = self.stats
            st["wait_s"] += wait
            st["last_wait_s"] = wait
            st["skipped_corrupt"] += int(n_bad)
            st["read_retries"] += int(io_stats["retries"])
            st["failed_shards"] += int(io_stats["failed_shards"])
            st["truncated_shards"] += int(io_stats["truncated_shards"])
            st["samples"] += len(keys)
            per_source = st["source_samples"]
            if self.plan.mixed:  # keys are `name/key`; a replaced bad sample counts for the source it repeats
                for k in keys:
                    per_source[k.split("/", 1)[0]] += 1
            else:
                per_source[self.sources[0].name] += len(keys)
            st["batches"] += 1
            self._consumed += 1
            done = self._consumed == T
            if done:  # epoch finished: the state moves to the start of the next one
                self._epoch, self._history, self._consumed = self._epoch + 1, [], 0
                self._segment = self._fresh_segment()
            if self._live is not None:
                self._live[1] = self._start_point()
            yield (images, labels, list(keys)) if with_keys else (images, labels)
            if done:
                return

    def forever(self):
        """Endless batches over successive epochs (step-based training loops)."""
        while True:
            yield from self
