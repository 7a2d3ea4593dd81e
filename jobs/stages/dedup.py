"""Stage ``dedup``: exclude pretraining images that near-duplicate downstream test images (the paper de-duplicated
its pretraining sets against the evaluation sets)."""

from __future__ import annotations

from typing import Any

from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.store import StageResult, join
from vitpipe.jobs.tasks import make_task


class DedupStage:
    name = "dedup"
    version = "1"

    def inputs(self, cfg: Any) -> list[str]:
        return ["ingest"]

    def config(self, cfg: Any) -> dict:
        return {"tasks": list(cfg.data.dedup_tasks), "max_distance": cfg.data.dedup_max_distance}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        from vitpipe.pipeline.dedup import dedup

        report = dedup(ctx.inputs["ingest"].path("manifest"), [make_task(t) for t in cfg.data.dedup_tasks],
                       max_distance=cfg.data.dedup_max_distance)
        report.save(join(ctx.url, "exclude.json"))
        if hasattr(ctx.tracker, "text"):
            import json
            ctx.tracker.text(json.dumps(report.to_dict(), indent=1), "dedup_report.json")
        return StageResult(stage=self.name, key=ctx.key, artifacts={"exclude": "exclude.json"},
                           metrics={"excluded": report.num_excluded, "matches": len(report.matches),
                                    "pretrain_images": report.num_pretrain, "test_images": report.num_test})
