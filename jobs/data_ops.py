"""Data verbs that need orchestration: ingest fanned out as Ray tasks over a cluster, dedup against eval tasks."""

from __future__ import annotations

import logging
import time

from vitpipe.pipeline import IngestConfig, Manifest, finalize, plan_ingest, write_shard
from vitpipe.pipeline.manifest import url_to_fs

log = logging.getLogger(__name__)


def ray_ingest(source: str, dest: str, cfg: IngestConfig, storage_options: dict | None = None,
               progress: bool = True) -> Manifest:
    """The pipeline's ingest with one Ray task per shard (any number of nodes writing to any fsspec URL).

    The plan (which item goes to which shard) is the same pure function as the local ingest, so the output is
    identical; finished shards are skipped by ``write_shard``, so a rerun resumes; the manifest is written last.
    """
    import ray
    from tqdm import tqdm

    from vitpipe.jobs.raytools import ensure_ray

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
    with tqdm(total=len(plan.items), unit="img", unit_scale=True, desc="ingest (ray)", disable=not progress) as bar:
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
