"""Stage ``dedup``: exclude pretraining images that near-duplicate downstream test images (the paper de-duplicated
its pretraining sets against the evaluation sets)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.base import StageContext
from vitpipe.jobs.evals.taskspec import make_task
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig


class DedupStage:
    name = "dedup"
    version = "1"

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return ["ingest"]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {"tasks": cfg.data.dedup_tasks, "max_distance": cfg.data.dedup_max_distance}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return None  # its own hashing pool

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        from vitpipe.pipeline.dedup import dedup

        report = dedup(ctx.inputs["ingest"].path("manifest"), [make_task(t) for t in cfg.data.dedup_tasks],
                       max_distance=cfg.data.dedup_max_distance)
        report.save(join_url(ctx.url, "exclude.json"))
        ctx.tracker.text(json.dumps(report.to_dict(), indent=1), "dedup_report.json")
        return StageResult(stage=self.name, key=ctx.key, artifacts={"exclude": "exclude.json"},
                           metrics={"excluded": report.num_excluded, "matches": len(report.matches),
                                    "pretrain_images": report.num_pretrain, "test_images": report.num_test})
