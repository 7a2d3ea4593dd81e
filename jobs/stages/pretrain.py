"""Stage ``pretrain``: DeepSpeed ZeRO training of a ViT from the ingested shards, inside a Ray Train TorchTrainer.

Writes (under its stage folder): Ray Train's run folder ``ray/`` with the sharded DeepSpeed checkpoints (the data
stream's position inside), then ``model.pt`` (consolidated fp32 state_dict) and ``model.json`` (the ViTConfig, grid,
prefix-token count): the only two files the evaluation stages read.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

from vitpipe.jobs.core.store import StageResult, exists, local_path
from vitpipe.jobs.core.raytools import MALLOC_ENV, ensure_ray
from vitpipe.jobs.stages.base import StageContext
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.evaluation import EVALS_FILE, prepare_evals
from vitpipe.jobs.train.hooks import TEST_HOOKS_ENV
from vitpipe.jobs.train.progress import ProgressCallback, ProgressFeed
from vitpipe.jobs.train.spec import PretrainSpec, TrackerRef
from vitpipe.jobs.train.trainer import pretrain_worker
from vitpipe.jobs.train.worker_env import local_head_train_env, train_entry, worker_env_vars
from vitpipe.pipeline import Manifest, SourceSpec, union_classes
from vitpipe.pipeline.fsio import join_url

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

log = logging.getLogger(__name__)
# Ray Train's wait for one placement of the worker group; it retries a timed-out placement as a controller failure.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"


def placement_attempts(timeout_s: float) -> tuple[int, float]:
    """How many of Ray Train's placement attempts cover ``timeout_s``, and the seconds each one waits."""
    attempt_s = float(os.environ.get(START_TIMEOUT_ENV, "60"))
    return max(1, math.ceil(timeout_s / attempt_s - 1e-9)), attempt_s


class PretrainStage:
    name = "pretrain"
    version = "3"

    def inputs(self, cfg: PipelineConfig) -> list[str]:
        return ["ingest", "dedup"] if "dedup" in cfg.stages else ["ingest"]

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        # Topology is not part of the key (runtime fields): the same run may resume on another number of workers
        # (elastic, universal checkpoints).
        return {"model": cfg.model, "pretrain": pretrain_config(cfg)}

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        return None  # launches its own Ray Train worker group

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult:
        from ray.train import CheckpointConfig, ControllerError, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        p = pretrain_config(cfg)
        p = replace(p, evals=prepare_evals(p.evals))  # in-training eval: checked here, task paths made absolute
        manifest_url = ctx.inputs["ingest"].path("manifest")
        # near-duplicates of evaluation images never reach pretraining
        exclude_url = ctx.inputs["dedup"].path("exclude") if "dedup" in ctx.inputs else None
        # checked here, before any worker starts: a limit above the images left fails in one line
        subset = subset_summary(manifest_url, exclude_url, cfg.data) if cfg.data.limit is not None else None
        sources = mix_sources(p.sources, manifest_url, exclude_url)
        classes = union_classes([Manifest.load(s.url) for s in sources]) if sources else \
            Manifest.load(manifest_url).classes
        spec = PretrainSpec(model=replace(cfg.model, num_classes=len(classes)), pretrain=p,
                            manifest_url=manifest_url, out_url=ctx.url, exclude_url=exclude_url, sources=sources,
                            tracking=TrackerRef.of(ctx.tracker))
        datasets = training_datasets(spec)  # the Dataset column of this run (and, via the runner, the pipeline's)
        for d in datasets:
            ctx.tracker.dataset(**d)
        progress = ctx.report
        progress.update(info="starting Ray")
        t_ray = time.perf_counter()
        ensure_ray()
        local_head_train_env()
        timing = {"ray_start_s": time.perf_counter() - t_ray}
        storage = local_path(ctx.url) or ctx.url
        threads = p.threads_per_worker or p.cpus_per_worker
        # Ray Train's default retries a worker group that cannot be placed forever (controller_failure_limit=-1): a
        # lost node that never comes back, or a STRICT_SPREAD that no longer fits, would hang the run.
        attempts, attempt_s = placement_attempts(p.placement_timeout_s)
        feed = ProgressFeed(progress)
        trainer = TorchTrainer(
            _train_loop(feed),
            train_loop_config=spec.to_dict(),
            scaling_config=ScalingConfig(num_workers=p.num_workers, use_gpu=p.use_gpu,
                                         resources_per_worker={"CPU": p.cpus_per_worker},
                                         placement_strategy=p.placement_strategy),
            run_config=RunConfig(
                name="ray", storage_path=storage,
                failure_config=FailureConfig(max_failures=p.max_failures, controller_failure_limit=attempts - 1),
                checkpoint_config=CheckpointConfig(num_to_keep=p.keep_checkpoints),
                worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                                                 **MALLOC_ENV, **worker_env_vars(p.use_gpu), **_test_hooks_env()}},
            ),
        )
        try:
            progress.update(info="starting workers")
            with feed:
                try:
                    result = trainer.fit()
                finally:
                    feed.mark("fit_returned")
                    timing.update(fit_timing(feed.marks))
                    log.info("pretrain timing: %s", ", ".join(f"{k} {v:.1f}s" for k, v in timing.items()))
        except ControllerError as e:
            if not _is_placement_timeout(e.controller_failure):
                raise
            raise RuntimeError(_unplaced(p, attempts * attempt_s, ctx)) from e
        if result.error:
            raise result.error
        if not exists(join_url(ctx.url, "model.pt")):
            raise RuntimeError(f"pretrain finished but wrote no model.pt under {ctx.url}")
        # The last logging window, kept with the result for the report; not logged again as metrics (the per-step
        # history is in the tracker already).
        final = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
        ckpt_path = result.checkpoint.path if result.checkpoint else None
        return StageResult(stage=self.name, key=ctx.key,
                           artifacts={"model": "model.pt", "model_config": "model.json",
                                      **({"evals": EVALS_FILE} if exists(join_url(ctx.url, EVALS_FILE)) else {})},
                           info={"checkpoint": ckpt_path, "num_classes": len(classes), "classes": classes,
                                 "final": final, "datasets": datasets, "timing": timing,
                                 **({"subset": subset} if subset else {})})


def _train_loop(feed: ProgressFeed) -> Any:
    """The Ray Train entry: ``pretrain_worker`` in a prepared worker (``worker_env``: quiet, no op build), with
    rank 0's progress callback feeding ``feed``."""
    return partial(train_entry, pretrain_worker, deepspeed=True, callbacks=[ProgressCallback(feed.sender())])


def fit_timing(marks: dict[str, float]) -> dict[str, float]:
    """Where a Ray Train fit's time went, from a progress feed's marks (seconds since the feed opened):
    ``workers_start_s`` (worker group start, imports, DeepSpeed and stream setup, up to rank 0's first step) and
    its parts when rank 0 sent its setup milestones: ``group_start_s`` (Ray Train's controller and worker actors,
    the process group, up to the train function), ``setup_s`` (the trainer: DeepSpeed engine, stream, restored
    state), ``first_step_wait_s`` (the callbacks' start: in-training evaluation setup and its step-0 point);
    ``train_s`` (first step to the end of training), ``finish_s`` (export and worker group shutdown)."""
    out: dict[str, float] = {}
    if "start" in marks:
        out["workers_start_s"] = marks["start"]
        if "entered" in marks and "ready" in marks:
            out.update(group_start_s=marks["entered"], setup_s=marks["ready"] - marks["entered"],
                       first_step_wait_s=marks["start"] - marks["ready"])
        if "end" in marks:
            out["train_s"] = marks["end"] - marks["start"]
            if "fit_returned" in marks:
                out["finish_s"] = marks["fit_returned"] - marks["end"]
    elif "fit_returned" in marks:
        out["fit_s"] = marks["fit_returned"]
    return out


INGEST_SOURCE = "ingest"
"""The url of ``pretrain.sources`` entries that stand for this pipeline's own ingested data."""


def mix_sources(sources: tuple[SourceSpec, ...], manifest_url: str, exclude_url: str | None) -> tuple[SourceSpec, ...]:
    """``pretrain.sources`` with the ``ingest`` entry resolved to the ingest stage's manifest and the dedup
    exclusions; () when the run pretrains on its ingested data alone."""
    return tuple(replace(s, url=manifest_url, exclude=s.exclude or exclude_url, name=s.name or INGEST_SOURCE)
                 if s.url == INGEST_SOURCE else s for s in sources)


def pretrain_config(cfg: PipelineConfig) -> PretrainConfig:
    """``cfg.pretrain`` with ``data.limit`` applied: to the stream of the ingested data, or to the ``ingest`` entry
    of ``pretrain.sources``; the subset is then part of the pretrain key (and only of keys from pretrain on)."""
    p, d = cfg.pretrain, cfg.data
    if d.limit is None:
        return p
    stream = replace(p.stream, limit_seed=d.limit_seed)
    if p.sources:
        return replace(p, stream=stream, sources=tuple(replace(s, limit=d.limit) if s.url == INGEST_SOURCE
                                                       and s.limit is None else s for s in p.sources))
    return replace(p, stream=replace(stream, limit=d.limit))


def subset_summary(manifest_url: str, exclude_url: str | None, data: Any) -> dict[str, Any]:
    """The ``data.limit`` subset of the ingested data (``vitpipe.pipeline.subset``, after the dedup exclusions):
    ``{"limit", "seed", "size", "available", "per_class": {class: n}}``. ConfigError when it asks for more
    images than are left."""
    import numpy as np

    from vitpipe.jobs.core.configtools import ConfigError
    from vitpipe.pipeline import StreamConfig
    from vitpipe.pipeline.multisource import build_plan
    from vitpipe.pipeline.subset import read_label_index

    manifest = Manifest.load(manifest_url)
    full = build_plan(manifest, StreamConfig(exclude=exclude_url))
    try:
        plan = build_plan(manifest, StreamConfig(exclude=exclude_url, limit=data.limit, limit_seed=data.limit_seed))
    except ValueError as e:
        raise ConfigError(f"data.limit={data.limit}: {str(e).removeprefix('StreamConfig.limit: ')}") from None
    counts = np.zeros(len(manifest.classes), dtype=np.int64)
    for s, (keys, labels) in enumerate(read_label_index(manifest)):
        gone = plan.exclude.get(s, set())
        alive = labels[np.fromiter((k not in gone for k in keys), dtype=bool, count=len(keys))]
        counts += np.bincount(alive[plan.keep[s]], minlength=len(counts))
    return {"limit": data.limit, "seed": data.limit_seed, "size": int(plan.total), "available": int(full.total),
            "per_class": {c: int(n) for c, n in zip(manifest.classes, counts.tolist())}}


def training_datasets(spec: PretrainSpec) -> list[dict[str, Any]]:
    """The data the workers stream as dataset inputs (``Tracker.dataset`` arguments, MLflow's Dataset column): one
    per source, its manifest URL as source, a digest of exactly the samples streamed (shard hashes, exclusions,
    subset) and its counts as profile. The plan is the one the workers' ``ShardStream`` builds from the same
    settings."""
    import hashlib
    import json

    import numpy as np

    from vitpipe.pipeline.multisource import build_plan

    p = spec.pretrain
    scfg = replace(p.resolved_stream(), exclude=None if spec.sources else spec.exclude_url or p.stream.exclude)
    plan = build_plan(list(spec.sources) or spec.manifest_url, scfg)
    out = []
    for src, m in zip(plan.sources, plan.manifests):
        h = hashlib.sha256()
        excluded = 0
        for s in range(src.shard_offset, src.shard_offset + src.num_shards):
            gone = sorted(plan.exclude.get(s, ()))
            excluded += len(gone)
            h.update(json.dumps([plan.sha256[s], gone]).encode())
            if s in plan.keep:
                h.update(np.asarray(plan.keep[s], dtype=np.int64).tobytes())
        label, split = m.source.rstrip("/").rsplit("/", 1)[-1], m.options.get("split")
        name = src.name if plan.mixed or not label else label + (f"-{split}" if split else "")  # e.g. cifar10-train
        profile = {"num_samples": src.size, "num_shards": src.num_shards, "num_classes": len(m.classes),
                   "num_excluded": excluded, "limit": src.limit, "ingested_from": m.source}
        if plan.mixed:
            profile["weight"] = src.weight
        out.append({"name": name, "source": src.url, "digest": h.hexdigest()[:10], "profile": profile})
    return out


def _test_hooks_env() -> dict[str, str]:
    """A test's fault-injection settings travel to the workers as they are (``vitpipe.jobs.train.hooks``)."""
    return {TEST_HOOKS_ENV: os.environ[TEST_HOOKS_ENV]} if os.environ.get(TEST_HOOKS_ENV) else {}


def _is_placement_timeout(err: BaseException | None) -> bool:
    """Ray Train gave up placing the worker group. Its class lives in ``ray.train.v2._internal`` (not public API),
    so it is matched by name: a module Ray moves cannot break the stage."""
    return any(c.__name__ == "WorkerGroupStartupTimeoutError" for c in type(err).__mro__)


def _unplaced(p: PretrainConfig, waited_s: float, ctx: StageContext) -> str:
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
