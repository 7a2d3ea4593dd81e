"""Stage ``ingest``: an image folder (or tar / list-file source) -> WebDataset shards + manifest."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.store import StageResult, join
from vitpipe.pipeline import ingest


class IngestStage:
    name = "ingest"
    version = "1"

    def inputs(self, cfg: Any) -> list[str]:
        return []

    def config(self, cfg: Any) -> dict:
        # Worker count and progress do not change what is written; leave them out of the key.
        return {"source": cfg.data.root, "ingest": to_dict(replace(cfg.ingest, num_workers=0))}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        src = cfg.data.root
        if "://" not in src and not os.path.isdir(src):
            raise FileNotFoundError(f"data.root: no such folder '{src}' (expected <root>/<split>/<class>/*.jpg)")
        manifest = ingest(src, join(ctx.url, "shards"), cfg.ingest, progress=ctx.progress)
        bad = sum(manifest.bad.values())
        if hasattr(ctx.tracker, "text"):
            import json
            ctx.tracker.text(json.dumps(manifest.to_dict(), indent=2), "manifest.json")
        return StageResult(
            stage=self.name, key=ctx.key,
            metrics={"num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
                     "num_classes": len(manifest.classes), "bad_samples": bad},
            artifacts={"manifest": "shards/manifest.json"},
            info={"classes": manifest.classes, "bad": dict(manifest.bad)})
