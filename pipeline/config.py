"""Typed configurations of the data layer: `IngestConfig` (source -> shards) and `StreamConfig` (shards -> batches)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from .augment import MAX_MAGNITUDE
from .fields import result_dict, runtime_field


@dataclass(kw_only=True)
class IngestConfig:
    """How a source (image folder, tar/WebDataset, list file) becomes WebDataset shards plus a manifest."""

    split: str | None = None
    """Image folders: sub-folder `<root>/<split>/<class>/*` to ingest; None ingests `<root>/<class>/*`."""
    shard_max_samples: int | None = 5000
    """Close a shard once it holds this many samples (None: no sample limit)."""
    shard_max_bytes: int | None = None
    """Close a shard once the source bytes planned into it reach this size (None: no byte limit). Planned from the
    input sizes, so with `resize_short` the written shards come out smaller."""
    resize_short: int | None = None
    """Shrink images whose short side exceeds this to that short side (None: never resize)."""
    keep_original: bool = False
    """With `resize_short`, also store the untouched source bytes as `<key>.orig.<ext>`."""
    quality: int = 95
    """JPEG quality when an image has to be re-encoded (resized, or not a JPEG at the source)."""
    max_bad_fraction: float = runtime_field(0.01)
    """Stop with `IngestError` when more than this fraction of the source items is bad (corrupt, unreadable...)."""
    num_workers: int = runtime_field(2)
    """Processes writing shards in parallel (0 or 1: in-process)."""
    limit_per_class: int | None = None
    """Keep at most this many items per class (the first ones in sorted order); None keeps all."""
    seed: int = 0
    """Seed of the deterministic item shuffle across shards (shards are class-mixed, not class-sorted)."""
    classes: list[str] | None = None
    """Fixed class map; items whose label is not in it are counted as bad `unknown_class`. None: derived."""
    multi_label: bool | None = None
    """Force multi-label shards (`<key>.labels`) even when every item has one label; None: auto-detect."""
    verify_reused: bool = runtime_field(True)
    """On resume, re-hash a shard whose sidecar says it is complete and rewrite it when its sha256 differs (costs one
    read of every reused shard; False trusts the sidecar's fingerprint and the byte size alone)."""

    def __post_init__(self) -> None:
        if self.shard_max_samples is None and self.shard_max_bytes is None:
            raise ValueError("IngestConfig: set shard_max_samples or shard_max_bytes (both are None)")
        if self.shard_max_samples is not None and self.shard_max_samples < 1:
            raise ValueError(f"IngestConfig.shard_max_samples must be >= 1, got {self.shard_max_samples}")
        if self.shard_max_bytes is not None and self.shard_max_bytes < 1:
            raise ValueError(f"IngestConfig.shard_max_bytes must be >= 1, got {self.shard_max_bytes}")
        if self.resize_short is not None and self.resize_short < 1:
            raise ValueError(f"IngestConfig.resize_short must be >= 1, got {self.resize_short}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"IngestConfig.quality must be in [1, 100], got {self.quality}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"IngestConfig.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.num_workers < 0:
            raise ValueError(f"IngestConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.limit_per_class is not None and self.limit_per_class < 1:
            raise ValueError(f"IngestConfig.limit_per_class must be >= 1, got {self.limit_per_class}")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("IngestConfig.classes has duplicate names")

    def to_dict(self) -> dict:
        """JSON-ready copy (stored in the manifest as the ingest options)."""
        return asdict(self)

    def output_fingerprint(self) -> dict:
        """The options that change shard contents (resume only reuses shards written with the same ones)."""
        return result_dict(self)


@dataclass(kw_only=True)
class StreamConfig:
    """How shards become batches on one rank: order, augmentation, batching, loader workers."""

    batch_size: int = 128
    """Per-rank batch size."""
    img_size: int = 32
    """Output side length (square images)."""
    train: bool = True
    """True: Inception random-resized crop + flip; False: resize short side + center crop."""
    seed: int = 0
    """Seed of the shard/sample order and of the per-sample augmentation (derived with epoch and key)."""
    shuffle: bool = True
    """Shuffle shards and samples per epoch (False: manifest order, e.g. for feature extraction)."""
    shuffle_buffer: int = 2000
    """Block size of the deterministic block-wise sample shuffle (the analogue of a shuffle buffer)."""
    num_workers: int = runtime_field(0)
    """torch DataLoader worker processes per rank (0: decode in the calling process)."""
    drop_last: bool = True
    """True: drop the < world*batch samples of an epoch that do not fill a global batch. False: pad by repeating
    the first samples of the epoch's order (fewer than world*batch) so every sample is seen."""
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    """Area fraction range of the random-resized crop."""
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range of the random-resized crop."""
    crop: Literal["rrc", "pad"] = "rrc"
    """Train crop. "rrc": the Inception random-resized crop above. "pad": the CIFAR crop: the eval view (resize short
    side + centre crop), reflection-padded by `pad_px` on each side, then a random `img_size` window (translations
    of up to `pad_px` pixels, no rescaling)."""
    pad_px: int = 4
    """Reflection padding of the "pad" crop."""
    hflip: bool = True
    """Random horizontal flip (train only)."""
    randaug_num_ops: int = 0
    """RandAugment ops per image after crop + flip (train only; 0: off, the plain crop + flip path unchanged)."""
    randaug_magnitude: int = 0
    """RandAugment magnitude on the reference's level scale (10 = nominal maxima; AugReg uses 0, 10, 15, 20)."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std dividing after mean subtraction."""
    pin_memory: bool = runtime_field(False)
    """Pin batches in page-locked memory (only useful with a CUDA device)."""
    prefetch_factor: int = runtime_field(2)
    """Batches each loader worker prepares ahead (each worker holds prefetch_factor + 2 shared-memory slots)."""
    exclude: str | None = None
    """URL of an exclusion list (JSON `{shard name: [keys]}`, e.g. from `vitpipe.pipeline.dedup`) to skip."""
    limit: int | None = None
    """Stream a class-balanced subset of this many samples (after exclusions), chosen per class from a permutation
    seeded by `limit_seed`; subsets of one seed are nested (see `vitpipe.pipeline.subset`). None: all samples."""
    limit_seed: int = 0
    """Seed of the `limit` subset (and of `SourceSpec.limit`); separate from `seed` so a sweep keeps its subsets."""
    epoch_samples: int | None = None
    """Positions per epoch of a mix of sources (`SourceSpec`), split by weight; None: the sum of the source sizes.
    With one manifest, a fixed epoch length cycling through it."""
    read_retries: int = runtime_field(3)
    """Attempts for a shard read that fails with a transient I/O error (exponential backoff)."""
    verify: bool = runtime_field(False)
    """Check each shard's sha256 against the manifest when it is read; a mismatching shard is skipped whole, like
    an unreadable one (counted in `failed_shards`, its samples replaced). Costs one sha256 pass over every shard
    read (each cache miss), on the loader workers."""
    storage_options: dict = runtime_field(default_factory=dict)
    """fsspec storage options (e.g. `{"endpoint_url": ...}` for S3-compatible stores)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"StreamConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.img_size < 1:
            raise ValueError(f"StreamConfig.img_size must be >= 1, got {self.img_size}")
        if self.shuffle_buffer < 1:
            raise ValueError(f"StreamConfig.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.num_workers < 0:
            raise ValueError(f"StreamConfig.num_workers must be >= 0, got {self.num_workers}")
        lo, hi = self.rrc_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"StreamConfig.rrc_scale must satisfy 0 < lo <= hi <= 1, got {self.rrc_scale}")
        if self.crop not in ("rrc", "pad"):
            raise ValueError(f"StreamConfig.crop must be 'rrc' or 'pad', got {self.crop!r}")
        if self.pad_px < 0 or (self.crop == "pad" and self.pad_px >= self.img_size):
            raise ValueError(f"StreamConfig.pad_px must be in [0, img_size), got {self.pad_px}")
        if not 0.0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"StreamConfig.rrc_ratio must satisfy 0 < lo <= hi, got {self.rrc_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"StreamConfig.mean/std must have 3 entries and std > 0, got {self.mean}, {self.std}")
        if self.read_retries < 1:
            raise ValueError(f"StreamConfig.read_retries must be >= 1, got {self.read_retries}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"StreamConfig.limit must be >= 1, got {self.limit}")
        if self.epoch_samples is not None and not 1 <= self.epoch_samples <= 2**31:
            raise ValueError(f"StreamConfig.epoch_samples must be in [1, 2**31], got {self.epoch_samples}")
        if self.randaug_num_ops < 0:
            raise ValueError(f"StreamConfig.randaug_num_ops must be >= 0, got {self.randaug_num_ops}")
        if not 0 <= self.randaug_magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"StreamConfig.randaug_magnitude must be in [0, {MAX_MAGNITUDE}], "
                             f"got {self.randaug_magnitude}")
        self.rrc_scale = tuple(self.rrc_scale)
        self.rrc_ratio = tuple(self.rrc_ratio)
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)
