"""Stage ``finetune``: fine-tune the pretrained ViT at a higher resolution with a new zero head (Ray Train, DDP).

A one-worker fine-tune on this machine (``finetune.num_workers=1``, no cluster) runs in the driver process: the
same code as a worker group of one, without starting one (~15-20 s of a short stage on 2 cores)."""

from __future__ import annotations

import logging
import os
import time
from functools import partial
from typing import TYPE_CHECKING, Any

from vitpipe.jobs.core.store import StageResult, local_path, read_json
from vitpipe.jobs.core.raytools import MALLOC_ENV, ensure_ray
from vitpipe.jobs.stages.base import StageContext
from vitpipe.jobs.train.finetune_loop import finetune_in_process, finetune_worker
from vitpipe.jobs.train.progress import DirectSender, ProgressFeed
from vitpipe.jobs.train.spec import FinetuneSpec, TrackerRef
from vitpipe.jobs.train.worker_env import local_head_train_env, train_entry
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

log = logging.getLogger(__name__)


def in_process(num_workers: int) -> bool:
    """A fine-tune of one worker runs in the driver, unless the driver is on or joined to a cluster (a Ray job, or
    ``RAY_ADDRESS`` set), whose worker nodes are where the work belongs."""
    return num_workers == 1 and not (os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_ADDRESS"))


class FinetuneStage:
    name = "finetune"
    version = "4"  # 4: metric names eval/<task>/finetune, train/chosen_lr (jobs.core.metric_names)

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return ["pretrain"]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        return {"finetune": cfg.finetune}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        # in the driver's process it computes there; otherwise its launcher holds nothing (the Ray Train workers
        # request their own, as in a sequential run)
        f = cfg.finetune
        return {"CPU": float(f.cpus_per_worker)} if in_process(f.num_workers) else {"CPU": 0.0}

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        f = cfg.finetune
        progress = ctx.report
        spec = FinetuneSpec(finetune=f, pretrain_url=ctx.inputs["pretrain"].url, out_url=ctx.url,
                            tracking=TrackerRef.of(ctx.tracker))
        t0 = time.perf_counter()
        if in_process(f.num_workers):
            finetune_in_process(spec, ctx.tracker if ctx.tracker.run_id else None, DirectSender(progress))
            timing = {"in_process": True}
        else:
            progress.update(info="starting Ray")
            ensure_ray()
            local_head_train_env()
            timing = {"ray_start_s": time.perf_counter() - t0}
            feed = ProgressFeed(progress)
            trainer = TorchTrainer(
                partial(train_entry, finetune_worker, progress=feed.sender()), train_loop_config=spec.to_dict(),
                scaling_config=ScalingConfig(num_workers=f.num_workers,
                                             resources_per_worker={"CPU": f.cpus_per_worker}),
                run_config=RunConfig(name="ray", storage_path=local_path(ctx.url) or ctx.url,
                                     worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(f.cpus_per_worker),
                                                                      **MALLOC_ENV}}))
            progress.update(info="starting workers")
            with feed:
                result = trainer.fit()
                feed.mark("fit_returned")
            first = min((t for k, t in feed.marks.items() if k != "fit_returned"), default=None)
            timing.update({"fit_s": feed.marks["fit_returned"],
                           **({"workers_start_s": first} if first is not None else {})})
            if result.error:
                raise result.error
        out = read_json(join_url(ctx.url, "finetune.json"))  # written by rank 0 once the test split is scored
        timing.update(out.get("timing", {}), stage_s=time.perf_counter() - t0)
        log.info("finetune timing: %s", ", ".join(f"{k} {v:.1f}s" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in timing.items()))
        return StageResult(stage=self.name, key=ctx.key, metrics=out["metrics"], artifacts={"result": "finetune.json"},
                           info={"curve": out["curve"], "task": f.task, "task_name": out["task"],
                                 "img_size": f.img_size, "timing": timing})
