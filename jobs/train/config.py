"""Typed configuration of the pretraining stage (paper §4.1 / Appendix B.1 defaults where they apply)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vitpipe.pipeline import StreamConfig


@dataclass(kw_only=True)
class PretrainConfig:
    """How the pretrain stage trains: optimisation, sharding, workers, checkpoints."""

    steps: int = 200
    """Optimizer steps to train for (each step sees `global_batch` images)."""
    global_batch: int = 128
    """Images per optimizer step over all ranks (paper: 4096); reached by gradient accumulation."""
    micro_batch: int = 64
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
    """DeepSpeed ZeRO stage 0-3; None chooses by model size (ZeRO-2 below ~1B params, else ZeRO-3)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in backward (less memory, ~30% more compute)."""
    num_workers: int = 2
    """Ray Train workers (ranks)."""
    use_gpu: bool = False
    cpus_per_worker: int = 1
    threads_per_worker: int | None = None
    """torch intra-op threads per worker; None: cpus_per_worker (so workers never oversubscribe cores)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    checkpoint_every: int = 100
    """Save a (sharded) checkpoint every this many steps, and always at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept in the run's storage (older ones are deleted); a resume or rollback falls back to an older
    one when the newest is incomplete (its manifest does not list every rank's files at their saved sizes)."""
    checkpoint_upload: Literal["async", "sync"] = "async"
    """async: training goes on while Ray copies a checkpoint to the run's storage (the next save waits for it);
    sync: every rank waits for its own copy inside the report."""
    max_failures: int = 1
    """Worker-group restarts Ray Train attempts (each resumes from the last checkpoint)."""
    placement_timeout_s: float = 600.0
    """Seconds the workers may wait, over the stage, to be placed (at start, or for a restart after a lost node)
    before the stage fails naming `vitpipe resume`; counted in Ray Train's placement attempts of
    $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s), rounded up."""
    max_nonfinite: int = 3
    """Non-finite losses tolerated over the run before it fails: each one skips its batch and rolls back to the
    newest complete checkpoint (the step count goes back too; the data stream moves on past the bad batch)."""
    log_every: int = 10
    """Log metrics to the tracker every this many steps."""
    peak_tflops: float | None = None
    """Per-device peak for MFU (e.g. 989 for an H100 in bf16); None: MFU not reported."""
    seed: int = 0
    """Model init and data order seed."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    """How shards become batches (its batch_size is replaced by micro_batch)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"pretrain.steps must be >= 1, got {self.steps}")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ValueError("pretrain.micro_batch and pretrain.global_batch must be >= 1")
        if self.zero_stage is not None and self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"pretrain.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.num_workers < 1:
            raise ValueError(f"pretrain.num_workers must be >= 1, got {self.num_workers}")
        if self.lr <= 0:
            raise ValueError(f"pretrain.lr must be > 0, got {self.lr}")
        if self.placement_timeout_s <= 0:
            raise ValueError(f"pretrain.placement_timeout_s must be > 0, got {self.placement_timeout_s}")


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tuning (paper Appendix B.1.1): SGD momentum 0.9, no weight decay, clip 1, cosine with warmup."""

    task: str = "cifar10=../shared/data/cifar10"
    """Downstream task spec (see `vitpipe.jobs.tasks.make_task`): `name=<image folder>`, `digits`."""
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
    eval_batch_size: int = 256
    num_workers: int = 2
    cpus_per_worker: int = 1
    log_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lr_grid or min(self.lr_grid) <= 0:
            raise ValueError(f"finetune.lr_grid needs positive learning rates, got {self.lr_grid}")
        if self.steps < 1 or self.batch_size < 1 or self.img_size < 1:
            raise ValueError("finetune.steps, batch_size and img_size must be >= 1")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"finetune.ema_decay must be in (0, 1), got {self.ema_decay}")
