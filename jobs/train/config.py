"""Typed configuration of the pretraining stage (paper §4.1 / Appendix B.1 defaults where they apply)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from vitpipe.jobs.train.ds_config import check_stage_precision, resolve_precision
from vitpipe.pipeline import SourceSpec, StreamConfig
from vitpipe.pipeline.augment import AUGREG_PRESETS, augreg_preset
from vitpipe.pipeline.fields import runtime_field
from vitpipe.pipeline.mix import MixConfig


@dataclass(kw_only=True, frozen=True)
class TrainEvalConfig:
    """In-training evaluation (big_vision's ``evals``): every ``every`` steps, at the start and at the end, rank 0
    runs the few-shot ridge probe from the current weights on each task and logs ``eval/<task>/<k>shot`` (mean
    over seeds; ``..._std`` the seed spread) against the training step, to the pretrain run and ``evals.json``.

    Observation only: nothing here changes the weights (the section is a runtime field of ``PretrainConfig``, so it
    is not part of the pretrain cache key; a cached pretrain result keeps the curves it was trained with)."""

    tasks: tuple[str, ...] = ()
    """Task specs (``vitpipe.jobs.evals.taskspec``: ``name[@res]=<folder>``, ``digits``, ``name=shards:<train>[,<test>]``);
    empty: no in-training evaluation."""
    every: int = 100
    """Evaluate after every this many optimizer steps (and at the last step)."""
    at_start: bool = True
    """Also evaluate the initial weights (step 0) of a fresh run: the curve starts at random init."""
    split: Literal["validation", "test"] = "validation"
    """``validation``: each task's validation view (``<task>.val``: held-out slice of train, never its test split;
    the selection protocol's numbers); ``test``: the task's test split (reported numbers, not for choosing)."""
    shots: tuple[int, ...] = (1, 5, 10, 25)
    """Images per class of each few-shot sample."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One sample per seed; the spread over seeds gives the curves' error bars."""
    l2_reg: float = 1024.0
    """Ridge regulariser (the fewshot stage's default)."""
    test_limit: int | None = 500
    """Score on a fixed random subset of this many images per task (bounds the cost); None: all of them."""
    transfer_tasks: tuple[str, ...] = ()
    """Task labels (``hymenoptera``, ``hymenoptera_64px``) whose 10- and 25-shot validation accuracies make the
    ``eval/transfer_score`` curve; needs ``split=validation`` and shots 10 and 25."""
    max_stall: float | None = 0.1
    """Bound on evaluation time over training time in this attempt: an evaluation that would exceed it is postponed
    to the next multiple of ``every`` (the last step is always evaluated); None: never postponed."""
    threads: int | None = None
    """torch threads while evaluating (other ranks wait meanwhile: on one machine their cores are idle); None: the
    worker's own."""
    batch_size: int = 256
    """Images per forward pass."""
    image_cache_mb: int = 1024
    """Decoded images kept in memory across evaluations (only the weights change between them), up to this size;
    the rest are decoded again at every evaluation."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        object.__setattr__(self, "shots", tuple(int(k) for k in self.shots))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        object.__setattr__(self, "transfer_tasks", tuple(self.transfer_tasks))
        if self.every < 1:
            raise ValueError(f"pretrain.evals.every must be >= 1, got {self.every}")
        if not self.shots or min(self.shots) < 1 or len(set(self.shots)) != len(self.shots):
            raise ValueError(f"pretrain.evals.shots must be distinct positive ints, got {self.shots}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"pretrain.evals.seeds must be distinct and non-empty, got {self.seeds}")
        if not self.l2_reg > 0:
            raise ValueError(f"pretrain.evals.l2_reg must be > 0, got {self.l2_reg}")
        if self.test_limit is not None and self.test_limit < 1:
            raise ValueError(f"pretrain.evals.test_limit must be >= 1 or none, got {self.test_limit}")
        if self.max_stall is not None and not self.max_stall > 0:
            raise ValueError(f"pretrain.evals.max_stall must be > 0 or none, got {self.max_stall}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"pretrain.evals.threads must be >= 1 or none, got {self.threads}")
        if self.batch_size < 1:
            raise ValueError(f"pretrain.evals.batch_size must be >= 1, got {self.batch_size}")
        if self.image_cache_mb < 0:
            raise ValueError(f"pretrain.evals.image_cache_mb must be >= 0, got {self.image_cache_mb}")
        # How tasks, transfer_tasks, split and shots fit together is checked by the pretrain stage before it starts
        # (``vitpipe.jobs.train.evaluation.check_evals``): here any order of --set overrides is accepted.


@dataclass(kw_only=True, frozen=True)
class PretrainConfig:
    """How the pretrain stage trains: optimisation, sharding, workers, checkpoints."""

    steps: int = 200
    """Optimizer steps to train for (each step sees `global_batch` images)."""
    global_batch: int = 128
    """Images per optimizer step over all ranks (paper: 4096); reached by gradient accumulation."""
    micro_batch: int = runtime_field(64)
    """Images per forward/backward on one rank."""
    lr: float = 1e-3
    """Peak learning rate (paper on JFT: B 8e-4, L/16 4e-4, H/14 3e-4 at batch 4096)."""
    lr_base_batch: int | None = None
    """If set, the peak LR is scaled by global_batch / lr_base_batch (linear scaling rule)."""
    weight_decay: float = 0.1
    """Decoupled weight decay on weight matrices only (not biases, norms, position embeddings, cls)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 20
    """Linear warmup steps (paper: 10k at scale)."""
    schedule: Literal["linear", "cosine"] = "linear"
    """Decay after warmup, to zero at `steps`."""
    objective: Literal["classification", "mpp"] = "classification"
    """Supervised classification of the shards' labels, or self-supervised masked patch prediction (paper §4.6:
    50% of patch embeddings corrupted, predict the 3-bit mean colour of each)."""
    loss: Literal["softmax", "sigmoid"] = "softmax"
    """softmax cross-entropy, or the paper's sigmoid cross-entropy (multi-label capable; use with
    model.classifier_bias_init=-10)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    zero_stage: int | None = None
    """DeepSpeed ZeRO stage 0-3; None chooses by model size (ZeRO-1 below ~1B params, else ZeRO-3). 0 only in fp32
    (DeepSpeed's ZeRO-0 bf16 optimizer syncs the device per gradient tensor)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~30% more compute)."""
    compile: Literal["none", "inductor", "deepcompile"] = runtime_field("none")
    """Compile the model for training: none (eager), inductor (torch.compile of the module, every ZeRO stage and
    device), deepcompile (DeepSpeed's DeepCompile: ZeRO-1/2/3 graph passes on top of inductor; CUDA only). Changes
    speed, not results beyond rounding (tests/jobs/test_compile.py)."""
    num_workers: int = runtime_field(2)
    """Ray Train workers (ranks)."""
    use_gpu: bool = False
    cpus_per_worker: int = runtime_field(1)
    threads_per_worker: int | None = runtime_field(None)
    """torch intra-op threads per worker; None: cpus_per_worker (so workers never oversubscribe cores)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = runtime_field("PACK")
    checkpoint_every: int = 100
    """Save a (sharded) checkpoint every this many steps, and always at the end."""
    keep_checkpoints: int = runtime_field(2)
    """Checkpoints kept in the run's storage (older ones are deleted); a resume or rollback falls back to an older
    one when the newest is incomplete (its manifest does not list every rank's files at their saved sizes)."""
    checkpoint_upload: Literal["async", "sync"] = runtime_field("async")
    """async: training goes on while Ray copies a checkpoint to the run's storage (the next save waits for it);
    sync: every rank waits for its own copy inside the report."""
    max_failures: int = runtime_field(1)
    """Worker-group restarts Ray Train attempts (each resumes from the last checkpoint)."""
    placement_timeout_s: float = runtime_field(600.0)
    """Seconds the workers may wait, over the stage, to be placed (at start, or for a restart after a lost node)
    before the stage fails naming `vitpipe resume`; counted in Ray Train's placement attempts of
    $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), rounded up."""
    max_nonfinite: int = 3
    """Non-finite losses tolerated over the run before it fails: each one skips its step's update (the gradient norm
    is not finite on any rank: no micro-batch of the step reaches the weights) and rolls back to the newest complete
    checkpoint (the step count goes back too; the data stream moves on past the bad batch)."""
    log_every: int = runtime_field(10)
    """Log metrics to the tracker every this many steps."""
    peak_tflops: float | None = runtime_field(None)
    """Per-device peak for MFU (e.g. 989 for an H100 in bf16); None: MFU not reported."""
    seed: int = 0
    """Model init and data order seed."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """How shards become batches (its batch_size is replaced by micro_batch)."""
    sources: tuple[SourceSpec, ...] = ()
    """Weighted mix of ingested shard sets to pretrain on (``vitpipe.pipeline.multisource``: each source gets its
    weight's share of an epoch of ``stream.epoch_samples`` positions). The url ``ingest`` stands for this
    pipeline's own ingested data (with the dedup exclusions and ``data.limit``); others are manifest URLs. Empty:
    the ingested data alone."""
    mix: MixConfig = field(default_factory=MixConfig)
    """Mixup / CutMix / label smoothing of each micro-batch on the device (classification only)."""
    augreg: str | None = None
    """An AugReg preset (Steiner et al. 2021: none, light1, light2, medium1, medium2, strong1, strong2) that sets
    RandAugment (stream.randaug_num_ops/magnitude) and Mixup (mix.mixup_alpha, no CutMix) at once; None: those
    fields as given. Setting both a preset and one of its fields is an error."""
    evals: TrainEvalConfig = runtime_field(default_factory=TrainEvalConfig)
    """In-training evaluation (few-shot curves vs step); observation only, so not part of the cache key."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"pretrain.steps must be >= 1, got {self.steps}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("pretrain.micro_batch and pretrain.global_batch must be >= 1")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"pretrain.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage is not None:  # early where the device is known from the config (the engine checks again)
            check_stage_precision(self.zero_stage, resolve_precision(self.precision, "cuda" if self.use_gpu else "cpu"))
        if self.num_workers < 1:
            raise ValueError(f"pretrain.num_workers must be >= 1, got {self.num_workers}")
        if self.lr <= 0:
            raise ValueError(f"pretrain.lr must be > 0, got {self.lr}")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"pretrain.placement_timeout_s must be > 0, got {self.placement_timeout_s}")
        if self.compile not in ("none", "inductor", "deepcompile"):
            raise ValueError(f"pretrain.compile must be none, inductor or deepcompile, got {self.compile!r}")
        if self.augreg is not None:
            if self.augreg not in AUGREG_PRESETS:
                raise ValueError(f"pretrain.augreg must be one of {', '.join(AUGREG_PRESETS)} or none, "
                                 f"got {self.augreg!r}")
            preset = augreg_preset(self.augreg)
            explicit = [f"pretrain.stream.{k}" for k in preset.stream_fields() if getattr(self.stream, k) !=
                        getattr(_STREAM_DEFAULTS, k)]
            explicit += [f"pretrain.mix.{k}" for k in preset.mix_fields() if getattr(self.mix, k) !=
                         getattr(_MIX_DEFAULTS, k)]
            if explicit:
                raise ValueError(f"pretrain.augreg={self.augreg} sets {', '.join(explicit)}: set the preset or "
                                 f"the fields, not both")
        if self.objective == "mpp" and (self.resolved_mix().mixing or self.mix.label_smoothing):
            raise ValueError("pretrain.mix (Mixup/CutMix/label smoothing) needs labels: not with objective=mpp")

    def resolved_stream(self) -> StreamConfig:
        """``stream`` with the AugReg preset's RandAugment applied."""
        if self.augreg is None:
            return self.stream
        return dataclasses.replace(self.stream, **augreg_preset(self.augreg).stream_fields())

    def resolved_mix(self) -> MixConfig:
        """``mix`` with the AugReg preset's Mixup applied."""
        if self.augreg is None:
            return self.mix
        return dataclasses.replace(self.mix, **augreg_preset(self.augreg).mix_fields())


_STREAM_DEFAULTS = StreamConfig()
_MIX_DEFAULTS = MixConfig()


@dataclass(kw_only=True, frozen=True)
class FinetuneConfig:
    """Fine-tuning (paper Appendix B.1.1): SGD momentum 0.9, no weight decay, clip 1, cosine with warmup."""

    task: str = "cifar10=../shared/data/cifar10"
    """Downstream task spec (see `vitpipe.jobs.evals.taskspec.make_task`): `name=<image folder>`, `digits`."""
    img_size: int = 48
    """Fine-tune resolution (higher than pretraining; position embeddings are interpolated)."""
    steps: int = 200
    batch_size: int = 128
    """Global batch (split over workers)."""
    lr_grid: tuple[float, ...] = (0.01,)
    """LRs tried on a held-out slice of train (paper: 0.001, 0.003, 0.01, 0.03); one value skips the search."""
    grid_steps: int | None = None
    """Steps per grid point (None: `steps`)."""
    holdout_fraction: float | None = None
    """Held-out fraction of train for the grid (None: 2%, or 10% for sets under 20k images, as the paper)."""
    warmup_steps: int = 20
    grad_clip: float = 1.0
    ema_decay: float | None = None
    """Polyak averaging of weights (paper: 0.9999 for the headline runs); None disables."""
    train_limit: int | None = None
    """Use a fixed random subset of this many training images (smoke runs)."""
    test_limit: int | None = None
    """Score only the first this-many test images (smoke runs)."""
    eval_batch_size: int = runtime_field(256)
    num_workers: int = 2
    cpus_per_worker: int = runtime_field(1)
    log_every: int = runtime_field(10)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise ValueError(f"finetune.lr_grid needs positive learning rates, got {self.lr_grid}")
        if self.steps < 1 or self.batch_size < 1 or self.img_size < 1:
            raise ValueError("finetune.steps, batch_size and img_size must be >= 1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"finetune.ema_decay must be in (0, 1), got {self.ema_decay}")
