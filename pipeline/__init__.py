"""vitpipe.pipeline: data layer - sources -> WebDataset shards + manifest, deterministic resumable streaming,
decode/augment, downstream tasks, de-duplication. Imports neither vitpipe.models, Ray, MLflow nor DeepSpeed."""

from .dedup import DedupReport, dedup, phash
from .config import IngestConfig, StreamConfig
from .ingest import IngestError, IngestPlan, finalize, ingest, plan_ingest, plan_shards
from .manifest import Manifest, ShardInfo, load_exclusions
from .shardwriter import ShardResult, write_shard
from .sources import SourceItem, list_source
from .stream import ShardStream
from .tasks import DigitsTask, ImageFolderTask, ShardSetTask, Task
from .transforms import ImageTransform

__all__ = [
    "DedupReport", "DigitsTask", "dedup", "phash", "ImageFolderTask", "ImageTransform", "IngestConfig", "IngestError", "IngestPlan", "Manifest",
    "ShardInfo", "ShardResult", "ShardSetTask", "ShardStream", "SourceItem", "StreamConfig", "Task", "finalize", "ingest",
    "list_source", "load_exclusions", "plan_ingest", "plan_shards", "write_shard",
]
