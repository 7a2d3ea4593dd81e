"""Typed configurations of the data layer: `IngestConfig` (source -> shards) and `StreamConfig` (shards -> batches)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    max_bad_fraction: float = 0.01
    """Stop with `IngestError` when more than this fraction of the source items is bad (corrupt, unreadable...)."""
    num_workers: int = 2
    """Processes writing shards in parallel (0 or 1: in-process)."""
    limit_per_class: int | None = None
    """Keep at most this many items per class (the first ones in sorted order); None keeps all."""
    seed: int = 0
    """Seed of the deterministic item shuffle across shards (shards are class-mixed, not class-sorted)."""
    classes: list[str] | None = None
    """Fixed class map; items whose label is not in it are counted as bad `unknown_class`. None: derived."""
    multi_label: bool | None = None
    """Force multi-label shards (`<key>.labels`) even when every item has one label; None: auto-detect."""

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
        d = self.to_dict()
        for k in ("num_workers", "max_bad_fraction"):
            d.pop(k)
        return d


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
    num_workers: int = 0
    """torch DataLoader worker processes per rank (0: decode in the calling process)."""
    drop_last: bool = True
    """True: drop the < world*batch samples of an epoch that do not fill a global batch. False: pad by repeating
    the first samples of the epoch's order (fewer than world*batch) so every sample is seen."""
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    """Area fraction range of the random-resized crop."""
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range of the random-resized crop."""
    hflip: bool = True
    """Random horizontal flip (train only)."""
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel mean subtracted after scaling pixels to [0, 1]."""
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    """Per-channel std dividing after mean subtraction."""
    pin_memory: bool = False
    """Pin batches in page-locked memory (only useful with a CUDA device)."""
    prefetch_factor: int = 2
    """Batches each loader worker prepares ahead (each worker holds prefetch_factor + 2 shared-memory slots)."""
    exclude: str | None = None
    """URL of an exclusion list (JSON `{shard name: [keys]}`, e.g. from `vitpipe.pipeline.dedup`) to skip."""
    read_retries: int = 3
    """Attempts for a shard read that fails with a transient I/O error (exponential backoff)."""
    storage_options: dict = field(default_factory=dict)
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
        if not 0.0 < self.rrc_ratio[0] <= self.rrc_ratio[1]:
            raise ValueError(f"StreamConfig.rrc_ratio must satisfy 0 < lo <= hi, got {self.rrc_ratio}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"StreamConfig.mean/std must have 3 entries and std > 0, got {self.mean}, {self.std}")
        if self.read_retries < 1:
            raise ValueError(f"StreamConfig.read_retries must be >= 1, got {self.read_retries}")
        self.rrc_scale = tuple(self.rrc_scale)
        self.rrc_ratio = tuple(self.rrc_ratio)
        self.mean = tuple(self.mean)
        self.std = tuple(self.std)
