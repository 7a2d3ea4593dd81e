"""The whole pipeline's typed config: one section per component, each section owned by that component."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

from vitpipe.jobs.stages.analysis import AnalysisConfig
from vitpipe.jobs.stages.fewshot import FewshotStageConfig
from vitpipe.jobs.train.config import FinetuneConfig, PretrainConfig
from vitpipe.models import ViTConfig, is_default_normalisation
from vitpipe.pipeline import IngestConfig

ALL_STAGES = ("ingest", "dedup", "pretrain", "fewshot", "finetune", "analysis", "report")


@dataclass(kw_only=True, frozen=True)
class DataConfig:
    """Where the pretraining images come from."""

    root: str = "../shared/data/cifar10"
    """Image folder `<root>/<split>/<class>/*.jpg` (any fsspec URL), a tar/WebDataset source, or a list file."""
    dedup_tasks: tuple[str, ...] = ("cifar10=../shared/data/cifar10",)
    """Downstream tasks whose test images are removed from pretraining when near-duplicated (stage `dedup`)."""
    dedup_max_distance: int = 4
    """Max Hamming distance between 64-bit perceptual hashes counted as a near-duplicate."""
    limit: int | None = None
    """Pretrain on a class-balanced subset of this many images (after dedup exclusions), chosen at stream time
    (`vitpipe.pipeline.subset`): ingest and dedup stay shared by every subset, only pretrain and later stages
    differ. Subsets of one `limit_seed` are nested (the 5k subset is inside the 15k one). None: all images."""
    limit_seed: int = 0
    """Seed of the `limit` subset; separate from `pretrain.seed` so training-seed replicates share one subset."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"data.limit must be >= 1, got {self.limit}")


@dataclass(kw_only=True, frozen=True)
class TrackingConfig:
    """Experiment tracking (MLflow)."""

    enabled: bool = True
    uri: str | None = None
    """Tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///<store>/mlflow.db (no server needed)."""
    experiment: str = "vitpipe"
    artifact_location: str | None = None
    """Artifact root for a new experiment; None: <store>/mlartifacts."""
    register_model: bool = True
    """Register the pretrained model (pyfunc: images -> class probabilities) as `vitpipe-<recipe>`."""


@dataclass(kw_only=True, frozen=True)
class PipelineConfig:
    """One pipeline run: data -> shards -> pretrain -> few-shot / fine-tune / analysis -> report."""

    name: str = "demo"
    """Recipe name (recorded with the run)."""
    store: str = field(default_factory=lambda: os.environ.get("VITPIPE_STORE", "runs"))
    """fsspec root for stage outputs and run records (local path, file://, s3://, gs://); default $VITPIPE_STORE
    or ./runs."""
    stages: tuple[str, ...] = ALL_STAGES
    """Stages this run contains (report always reads whichever of the others are present)."""
    data: DataConfig = field(default_factory=DataConfig)
    ingest: IngestConfig = field(default_factory=lambda: IngestConfig(split="train"))
    model: ViTConfig = field(default_factory=lambda: ViTConfig.from_name("Ti/4", img_size=32, num_classes=10))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    fewshot: FewshotStageConfig = field(default_factory=FewshotStageConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in ALL_STAGES]
        if unknown:
            raise ValueError(f"unknown stage '{unknown[0]}' in stages (known: {', '.join(ALL_STAGES)})")
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.data.limit is not None and self.pretrain.stream.limit is not None:
            raise ValueError("data.limit and pretrain.stream.limit are both set: set data.limit only (the "
                             "pretrain stage passes it to the stream)")
        st = self.pretrain.stream
        if self.model.hybrid is not None and not is_default_normalisation(st.mean, st.std):
            raise ValueError("pretrain.stream.mean/std other than 0.5 need a plain patch embedding: the exported "
                             "model folds them into it (vitpipe.models.normalisation), which a hybrid ResNet stem "
                             "cannot take exactly")


def resolve_paths(cfg: PipelineConfig, base: str | None = None) -> PipelineConfig:
    """Make relative local paths absolute (against ``base`` or the cwd) so Ray workers and jobs agree on them."""
    base = base or os.getcwd()

    def absolute(p: str) -> str:
        if "://" in p or os.path.isabs(p):
            return p
        return os.path.normpath(os.path.join(base, p))

    def task(spec: str) -> str:
        name, sep, where = spec.partition("=")
        if where.startswith("shards:"):
            return f"{name}=shards:" + ",".join(absolute(u) for u in where.removeprefix("shards:").split(","))
        return f"{name}={absolute(where)}" if sep else spec

    p = cfg.pretrain
    sources = tuple(s if s.url == "ingest" else replace(s, url=absolute(s.url),
                                                        exclude=s.exclude and absolute(s.exclude))
                    for s in p.sources)
    return replace(
        cfg, store=absolute(cfg.store),
        data=replace(cfg.data, root=absolute(cfg.data.root), dedup_tasks=tuple(task(t) for t in cfg.data.dedup_tasks)),
        pretrain=replace(p, sources=sources, evals=replace(p.evals, tasks=tuple(task(t) for t in p.evals.tasks))),
        fewshot=replace(cfg.fewshot, tasks=tuple(task(t) for t in cfg.fewshot.tasks)),
        finetune=replace(cfg.finetune, task=task(cfg.finetune.task)),
        analysis=replace(cfg.analysis, task=task(cfg.analysis.task)),
    )

