"""vitpipe.pipeline: data layer - sources -> WebDataset shards + manifest, deterministic resumable streaming,
decode/augment, downstream tasks, de-duplication. Imports neither vitpipe.models, Ray, MLflow nor DeepSpeed."""

from .augment import AUGREG_PRESETS, AugRegPreset, RandAugment, augreg_preset
from .dedup import DedupReport, dedup, phash
from .config import IngestConfig, StreamConfig
from .ingest import IngestError, IngestPlan, finalize, ingest, plan_ingest, plan_shards
from .mix import MixConfig, mix_batch, smooth_targets
from .manifest import Manifest, ShardInfo, load_exclusions
from .shardwriter import ShardResult, write_shard
from .sources import SourceItem, list_source
from .multisource import SourceInfo, SourceSpec, union_classes
from .stream import ShardStream
from .subset import balanced_subset
from .tasks import DigitsTask, ImageFolderTask, ShardSetTask, Task
from .transforms import ImageTransform

__all__ = [
    "SourceInfo", "SourceSpec", "union_classes", "balanced_subset",
    "AUGREG_PRESETS", "AugRegPreset", "MixConfig", "RandAugment", "augreg_preset", "mix_batch", "smooth_targets",
    "DedupReport", "DigitsTask", "dedup", "phash", "ImageFolderTask", "ImageTransform", "IngestConfig", "IngestError", "IngestPlan", "Manifest",
    "ShardInfo", "ShardResult", "ShardSetTask", "ShardStream", "SourceItem", "StreamConfig", "Task", "finalize", "ingest",
    "list_source", "load_exclusions", "plan_ingest", "plan_shards", "write_shard",
]
