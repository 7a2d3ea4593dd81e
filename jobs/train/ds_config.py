"""The one place a DeepSpeed config is made: a pure function of the typed :class:`PretrainConfig`.

What a run gets, and why (measured with ``benchmarks/step_overhead.py``, which prints DeepSpeed's extra host time
per parameter tensor against a bare loop; its figures in ``benchmarks/results/``):

- ZeRO-1 by default below ~1B parameters: it reduces gradients once per optimizer step instead of hooking every
  parameter's gradient in every micro-step (ZeRO-2), and costs the same memory on one GPU; ZeRO-3 above.
- No throughput timer (it synchronises the device twice per step), no wall-clock breakdown, no progress prints.
- ``overlap_comm`` and ``contiguous_gradients`` only where there is communication to overlap (CUDA, more than one
  rank): on one device they add a copy and a stream synchronisation per gradient and overlap nothing.
- The optimizer is vitpipe's :class:`~vitpipe.jobs.train.adamw.ClippedAdamW` (torch's fused AdamW, on CUDA and
  CPU; no JIT-built DeepSpeed op) passed as a client optimizer. For ZeRO-1/2 it clips by the norm DeepSpeed
  computes (DeepSpeed's own clipping reads the norm back to the host once per parameter group); ZeRO-3 clips on
  the device itself. Every stage skips a step whose gradient norm is not finite, with one host read per step: in
  bf16 that norm check is ZeRO-1/2's only overflow check (``engine.overflow_by_norm``), and bf16 at ZeRO-0, whose
  DeepSpeed optimizer reads every gradient's overflow flag, is refused (:func:`check_stage_precision`).
- ZeRO-3 keeps whole every parameter it can afford to (``stage3_*_persistence_threshold``): on one rank all of
  them (a partition of one is the whole tensor anyway), on more ranks up to ``ZERO3_PERSIST_BYTES`` of 16-bit
  weights, so most layers are never gathered and released per step; with everything whole, no prefetching. And
  each transformer block is one ZeRO-3 "leaf" (``engine.build_engine``): one fetch per block, not per layer.
  With everything whole, DeepSpeed's "memory-efficient linear" is off: it would replace
  ``torch.nn.functional.linear`` process-wide with a slower Python autograd Function that only partitioned weights
  need.
"""

from __future__ import annotations

from typing import Any

# Below this many parameters ZeRO-1/2 is usually faster (no per-layer parameter gathers); above it the replicated
# fp32 weights + Adam state (16 bytes/param) start to crowd an 80 GB GPU, so ZeRO-3 shards the weights too.
ZERO3_THRESHOLD_PARAMS = 1_000_000_000
# 16-bit weights ZeRO-3 keeps unpartitioned on every rank (4 GiB: a 2B-parameter model whole), sparing the
# per-layer all-gathers; the fp32 master weights and Adam moments stay partitioned.
ZERO3_PERSIST_BYTES = 4 << 30


def default_zero_stage(num_params: int) -> int:
    """ZeRO stage chosen by model size when the config leaves it open."""
    return 3 if num_params >= ZERO3_THRESHOLD_PARAMS else 1


def resolve_zero_stage(p: Any, num_params: int) -> int:
    """``p.zero_stage``, or the default for a model of ``num_params`` parameters."""
    return p.zero_stage if p.zero_stage is not None else default_zero_stage(num_params)


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA, fp32 on CPU (bf16 matmuls are ~4x slower than fp32 on these CPUs)."""
    if precision == "auto":
        return "bf16" if device == "cuda" else "fp32"
    return precision


def check_stage_precision(stage: int, precision: str) -> None:
    """One-line ValueError for a ZeRO stage / precision pair whose DeepSpeed optimizer reads the device once per
    parameter tensor: bf16 at ZeRO-0 (DeepSpeed 0.19 wraps the client optimizer in ``FP16_UnfusedOptimizer``, whose
    overflow check reads each gradient's inf/NaN flag to the host: 397 host reads per H/14 step, measured with
    ``benchmarks/step_overhead.py --precision bf16``). ZeRO-1 does the same job with one read and never more memory."""
    if stage == 0 and precision == "bf16":
        raise ValueError("pretrain.zero_stage=0 with bf16 precision: DeepSpeed's ZeRO-0 bf16 optimizer reads every "
                         "gradient tensor's overflow flag back to the host (a device sync per parameter tensor and "
                         "step); use pretrain.zero_stage=1 (one sync per step, never more memory) or "
                         "pretrain.precision=fp32")


def optimizer_clips(stage: int, precision: str) -> bool:
    """Whether the client optimizer clips (ZeRO-1/2, and ZeRO-0 in fp32 where DeepSpeed has no optimizer wrapper)
    rather than DeepSpeed (ZeRO-3 and the bf16 ZeRO-0 optimizer, both of which clip on the device; bf16 at ZeRO-0
    is refused by :func:`check_stage_precision`, so for runs that pair only describes DeepSpeed)."""
    return stage in (1, 2) or (stage == 0 and precision != "bf16")


def accumulation_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient-accumulation steps so that micro_batch x world x steps == global_batch, or a clear error."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ValueError(f"pretrain.global_batch={global_batch} is not a multiple of pretrain.micro_batch x world "
                         f"size = {micro_batch} x {world_size} = {per_step}")
    return global_batch // per_step


def scaled_lr(p: Any) -> float:
    """Peak LR, linearly scaled by global_batch / lr_base_batch when a base batch is given."""
    return p.lr * (p.global_batch / p.lr_base_batch if p.lr_base_batch else 1.0)


def deepspeed_config(p: Any, *, world_size: int, device: str, num_params: int,
                     client_optimizer: bool = False) -> dict:
    """DeepSpeed JSON config for pretrain config ``p`` (a ``PretrainConfig``) on ``world_size`` ranks.

    ``client_optimizer``: the engine gets vitpipe's optimizer (``engine.build_engine``, what a run uses): no
    ``optimizer`` section, and clipping where :func:`optimizer_clips` puts it. False: DeepSpeed's own AdamW from
    the config (torch's AdamW: no JIT build of DeepSpeed's FusedAdam) with DeepSpeed's clipping, for callers that
    pass only ``model_parameters`` to ``deepspeed.initialize``.
    """
    stage = resolve_zero_stage(p, num_params)
    precision = resolve_precision(p.precision, device)
    check_stage_precision(stage, precision)
    lr = scaled_lr(p)
    warmup = max(1, min(p.warmup_steps, p.steps))
    if p.schedule == "cosine":
        scheduler = {"type": "WarmupCosineLR",
                     "params": {"total_num_steps": p.steps, "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
                                "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupDecayLR",
                     "params": {"total_num_steps": max(p.steps, warmup + 1), "warmup_num_steps": warmup,
                                "warmup_min_lr": 0.0, "warmup_max_lr": lr, "warmup_type": "linear"}}
    # Overlapping the gradient reduction with backward needs a side stream and a synchronisation at the end of
    # backward: worth it only with communication to hide (CUDA, > 1 rank). contiguous_gradients (a copy of every
    # gradient into one buffer against GPU memory fragmentation) goes with it; for ZeRO-1 it would add a hook per
    # parameter and micro-step.
    overlap = device == "cuda" and world_size > 1
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": overlap, "contiguous_gradients": overlap and stage >= 2}
    if stage == 3:
        budget = ZERO3_PERSIST_BYTES // (2 if precision == "bf16" else 4)  # in elements
        whole = world_size == 1 or num_params <= budget
        persist = max(num_params if whole else budget, 100_000)  # DeepSpeed's default per-tensor threshold: 1e5
        zero.update({"stage3_param_persistence_threshold": persist, "stage3_model_persistence_threshold": persist,
                     # Gather full fp32 weights on save so a checkpoint is also loadable outside DeepSpeed.
                     "stage3_gather_16bit_weights_on_model_save": True})
        # DeepSpeed's "memory-efficient linear" replaces torch.nn.functional.linear for the whole process with a
        # Python autograd Function (matmul + add instead of one fused kernel, its own backward) whose use is to
        # re-gather a weight partitioned by the time backward reaches it. With every weight whole there is none:
        # it only slows every Linear in the process, the bare ops of the evaluators included (measured on CPU, a
        # narrow H/14: the bare step 35 ms without it, 55 with; vitpipe's ZeRO-3 step ~118 ms without, ~152 with).
        zero["memory_efficient_linear"] = not whole
        if whole:
            # nothing is ever gathered, so nothing to prefetch: the prefetch bookkeeping is pure host time
            # (measured on CPU: ZeRO-3's extra time per tensor 262 -> 161 us)
            zero["stage3_prefetch_bucket_size"] = 0
    clip_here = client_optimizer and optimizer_clips(stage, precision)
    cfg = {
        "train_batch_size": p.global_batch,
        "train_micro_batch_size_per_gpu": p.micro_batch,
        "gradient_accumulation_steps": accumulation_steps(p.global_batch, p.micro_batch, world_size),
        "gradient_clipping": 0.0 if clip_here else p.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: skip a step whose gradient norm is not finite (the non-finite guard; the default,
        # stated because the loop relies on it)
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "scheduler": scheduler,
        "zero_allow_untested_optimizer": True,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "steps_per_print": 1 << 30,  # progress goes to the tracker, not DeepSpeed's stdout
        "wall_clock_breakdown": False,
    }
    if not client_optimizer:
        cfg["optimizer"] = {"type": "AdamW",
                            "params": {"lr": lr, "betas": list(p.betas), "eps": p.eps, "weight_decay": p.weight_decay,
                                       "torch_adam": True}}
    if p.compile == "deepcompile":
        cfg["compile"] = {"deepcompile": True}
    return cfg
