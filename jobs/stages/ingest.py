"""Stage ``ingest``: an image folder (or tar / list-file source) -> WebDataset shards + manifest; and the same
ingest fanned out as one Ray task per shard (``vitpipe ingest --ray``)."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.base import StageContext
from vitpipe.pipeline import IngestConfig, Manifest, finalize, ingest, plan_ingest, write_shard
from vitpipe.pipeline.fsio import join_url, url_to_fs

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

log = logging.getLogger(__name__)


class IngestStage:
    name = "ingest"
    version = "1"

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return []

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {"source": cfg.data.root, "ingest": cfg.ingest}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return None  # writes shards with its own process pool

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        src = cfg.data.root
        if "://" not in src and not os.path.isdir(src):
            raise FileNotFoundError(f"data.root: no such folder '{src}' (expected <root>/<split>/<class>/*.jpg)")
        progress = ctx.report
        progress.update(info=f"writing shards from {src}")
        # the pipeline's own bar is tqdm (carriage returns): the run's view shows the stage instead
        manifest = ingest(src, join_url(ctx.url, "shards"), cfg.ingest, progress=False)
        progress.update(completed=manifest.num_samples, total=manifest.num_samples, unit="images",
                        info=f"{len(manifest.shards)} shards")
        bad = sum(manifest.bad.values())
        ctx.tracker.text(json.dumps(manifest.to_dict(), indent=2), "manifest.json")
        return StageResult(
            stage=self.name, key=ctx.key,
            metrics={"num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
                     "num_classes": len(manifest.classes), "bad_samples": bad},
            artifacts={"manifest": "shards/manifest.json"},
            info={"classes": manifest.classes, "bad": dict(manifest.bad)})


def ray_ingest(source: str, dest: str, cfg: IngestConfig, storage_options: dict | None = None,
               progress: bool = True) -> Manifest:
    """The pipeline's ingest with one Ray task per shard (any number of nodes writing to any fsspec URL).

    The plan (which item goes to which shard) is the same pure function as the local ingest, so the output is
    identical; finished shards are skipped by ``write_shard``, so a rerun resumes; the manifest is written last.
    """
    import ray
    from tqdm import tqdm

    from vitpipe.jobs.core.raytools import ensure_ray

    ensure_ray()
    t0 = time.perf_counter()
    plan = plan_ingest(source, cfg, storage_options)
    fs, path = url_to_fs(dest, storage_options)
    fs.makedirs(path, exist_ok=True)
    task = ray.remote(num_cpus=1, max_retries=3)(write_shard)
    refs = [task.remote(plan.shard_items(i), plan.shard_url(dest, i), cfg, plan.class_index, plan.multi_label,
                        storage_options) for i in range(plan.num_shards)]
    order = {r: i for i, r in enumerate(refs)}
    results: list = [None] * len(refs)
    # disable=None: tqdm draws only on a terminal (no carriage-return bars in piped output)
    with tqdm(total=len(plan.items), unit="img", unit_scale=True, desc="ingest (ray)",
              disable=None if progress else True) as bar:
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = order[done[0]]
            results[i] = ray.get(done[0])
            bar.update(len(plan.shard_items(i)))
    manifest = finalize(plan, dest, results, cfg, storage_options)
    log.info("ray ingest %s -> %s: %d samples, %d shards in %.1fs", source, dest, manifest.num_samples,
             len(manifest.shards), time.perf_counter() - t0)
    return manifest
