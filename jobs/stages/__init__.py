"""Pipeline stages, one module each; every stage has ``inputs``, ``config`` and ``run(cfg, ctx) -> StageResult``."""

from vitpipe.jobs.stages.analysis import AnalysisStage
from vitpipe.jobs.stages.dedup import DedupStage
from vitpipe.jobs.stages.fewshot import FewshotStage
from vitpipe.jobs.stages.finetune import FinetuneStage
from vitpipe.jobs.stages.ingest import IngestStage
from vitpipe.jobs.stages.pretrain import PretrainStage
from vitpipe.jobs.stages.report import ReportStage

STAGES = {s.name: s for s in (IngestStage, DedupStage, PretrainStage, FewshotStage, FinetuneStage, AnalysisStage, ReportStage)}

__all__ = ["STAGES", "AnalysisStage", "DedupStage", "FewshotStage", "FinetuneStage", "IngestStage", "PretrainStage", "ReportStage"]
