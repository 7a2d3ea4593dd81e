"""Stage ``pretrain``: DeepSpeed ZeRO training of a ViT from the ingested shards, inside a Ray Train TorchTrainer.

Writes (under its stage folder): Ray Train's run folder ``ray/`` with the sharded DeepSpeed checkpoints (the data
stream's position inside), then ``model.pt`` (consolidated fp32 state_dict) and ``model.json`` (the ViTConfig, grid,
prefix-token count): the only two files the evaluation stages read.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import replace
from typing import Any

from vitpipe.jobs.configtools import to_dict
from vitpipe.jobs.graph import StageContext
from vitpipe.jobs.raytools import MALLOC_ENV, ensure_ray
from vitpipe.jobs.store import StageResult, exists, join, local_path
from vitpipe.jobs.train.loop import pretrain_worker
from vitpipe.pipeline import Manifest

log = logging.getLogger(__name__)

# Settings that change how a run is executed or observed, not what it computes: kept out of the cache key.
# Topology is also left out: the same run may resume on another number of workers (elastic, universal checkpoints).
_NOT_IN_KEY = ("log_every", "max_failures", "peak_tflops", "placement_strategy", "keep_checkpoints", "num_workers",
               "cpus_per_worker", "threads_per_worker", "micro_batch", "placement_timeout_s",
               "checkpoint_upload")
# Ray Train's wait for one placement of the worker group; it retries a timed-out placement as a controller failure.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def placement_attempts(timeout_s: float) -> tuple[int, float]:
    """How many of Ray Train's placement attempts cover ``timeout_s``, and the seconds each one waits."""
    attempt_s = float(os.environ.get(START_TIMEOUT_ENV, "60"))
    return max(1, math.ceil(timeout_s / attempt_s - 1e-9)), attempt_s


class PretrainStage:
    name = "pretrain"
    version = "3"

    def inputs(self, cfg: Any) -> list[str]:
        return ["ingest", "dedup"] if "dedup" in cfg.stages else ["ingest"]

    def config(self, cfg: Any) -> dict:
        p = {k: v for k, v in to_dict(cfg.pretrain).items() if k not in _NOT_IN_KEY}
        return {"model": to_dict(cfg.model), "pretrain": p}

    def run(self, cfg: Any, ctx: StageContext) -> StageResult:
        from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        p = cfg.pretrain
        manifest_url = ctx.inputs["ingest"].path("manifest")
        manifest = Manifest.load(manifest_url)
        mcfg = replace(cfg.model, num_classes=manifest.num_classes)
        pdict = to_dict(p)
        if "dedup" in ctx.inputs:  # near-duplicates of evaluation images never reach pretraining
            pdict["stream"]["exclude"] = ctx.inputs["dedup"].path("exclude")
        spec = {"model": mcfg.to_dict(), "pretrain": pdict, "manifest_url": manifest_url,
                "out_url": ctx.url, "tracking_uri": getattr(ctx.tracker, "uri", None),
                "mlflow_run_id": ctx.tracker.run_id,
                # test hooks (fault injection, sample-key recording); never set by configs
                "debug": json.loads(os.environ.get("VITPIPE_PRETRAIN_DEBUG", "{}"))}
        ensure_ray()
        storage = local_path(ctx.url) or ctx.url
        threads = p.threads_per_worker or p.cpus_per_worker
        # Ray Train's default retries a worker group that cannot be placed forever (controller_failure_limit=-1): a
        # lost node that never comes back, or a STRICT_SPREAD that no longer fits, would hang the run.
        attempts, attempt_s = placement_attempts(p.placement_timeout_s)
        trainer = TorchTrainer(
            pretrain_worker,
            train_loop_config=spec,
            scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                         resources_per_worker={"CPU": p.cpus_per_worker},
                                         placement_strategy=p.placement_strategy),
            run_config=RunConfig(
                name="ray", storage_path=storage,
                failure_config=FailureConfig(max_failures=p.max_failures, controller_failure_limit=attempts - 1),
                checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints),
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                                                 **MALLOC_ENV}},
            ),
        )
        try:
            result = trainer.fit()
        except ControllerError as e:
            if not _is_placement_timeout(e.controller_failure):
                raise
            raise RuntimeError(_unplaced(p, attempts * attempt_s, ctx)) from e
        if result.error:
            raise result.error
        if not exists(join(ctx.url, "model.pt")):
            raise RuntimeError(f"pretrain finished but wrote no model.pt under {ctx.url}")
        # the last logging window, as a summary (the per-step history is already in the tracker)
        metrics = {f"final_{k}": float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        ckpt_path = result.checkpoint.path if result.checkpoint else None
        return StageResult(stage=self.name, key=ctx.key, metrics=metrics,
                           artifacts={"model": "model.pt", "model_config": "model.json"},
                           info={"checkpoint": ckpt_path, "num_classes": manifest.num_classes,
                                 "classes": manifest.classes})


def _is_placement_timeout(err: BaseException | None) -> bool:
    """Ray Train gave up placing the worker group. Its class lives in ``ray.train.v2._internal`` (not public API),
    so it is matched by name: a module Ray moves cannot break the stage."""
    return any(c.__name__ == "WorkerGroupStartupTimeoutError" for c in type(err).__mro__)


def _unplaced(p: Any, waited_s: float, ctx: StageContext) -> str:
    """One line for a worker group that found no room: what it asked for, what the cluster has, how to go on."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    have = ", ".join(f"{k}: {v:g}" for k, v in sorted(ray.cluster_resources().items())
                     if k in ("CPU", "GPU") or not (k.startswith("node:") or k.endswith("memory")))
    return (f"pretrain: {p.num_workers} training workers ({p.cpus_per_worker} CPU{', 1 GPU' if p.use_gpu else ''} "
            f"each, {p.placement_strategy}) could not be placed for {waited_s:.0f}s (pretrain.placement_timeout_s="
            f"{p.placement_timeout_s:g}); the cluster has {len(alive)} alive node(s) with {have or 'nothing'}. "
            f"Checkpoints so far are kept: once the cluster has room, resume with "
            f"`vitpipe resume {ctx.run_id} --store {ctx.store.root}`")
