"""Pipeline stages, one module each (``run(cfg, ctx) -> StageResult``), the stage registry and ``stages_for``.

The protocol every stage follows and the cache-key rule are in ``base``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vitpipe.jobs.stages.analysis import AnalysisStage
from vitpipe.jobs.stages.base import Stage, StageContext, stage_key
from vitpipe.jobs.stages.dedup import DedupStage
from vitpipe.jobs.stages.fewshot import FewshotStage
from vitpipe.jobs.stages.finetune import FinetuneStage
from vitpipe.jobs.stages.ingest import IngestStage
from vitpipe.jobs.stages.pretrain import PretrainStage
from vitpipe.jobs.stages.report import ReportStage

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

STAGES: dict[str, type] = {s.name: s for s in (IngestStage, DedupStage, PretrainStage, FewshotStage, FinetuneStage,
                                              AnalysisStage, ReportStage)}


def stages_for(cfg: PipelineConfig) -> list[Stage]:
    """The stage objects of ``cfg.stages``, in the config's order."""
    return [STAGES[name]() for name in cfg.stages]


__all__ = ["STAGES", "AnalysisStage", "DedupStage", "FewshotStage", "FinetuneStage", "IngestStage", "PretrainStage",
           "ReportStage", "Stage", "StageContext", "stage_key", "stages_for"]
