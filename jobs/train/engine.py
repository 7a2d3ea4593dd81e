"""The DeepSpeed engine a pretraining rank trains with, built in one place: the config of
:func:`~vitpipe.jobs.train.ds_config.deepspeed_config`, vitpipe's fused optimizer, and the compile mode of
``pretrain.compile`` (applied here, never in ``models/``). Also reports which attention kernel the model really runs.

    engine, ds_cfg = build_engine(model, p, world_size=w, device=d, num_params=n)
    compile_engine(engine, p.compile)     # after anything that must see the eager module
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vitpipe.jobs.train.adamw import ClippedAdamW
from vitpipe.jobs.train.ds_config import deepspeed_config, optimizer_clips, scaled_lr
from vitpipe.jobs.train.optim import param_groups

log = logging.getLogger("vitpipe.pretrain")


def check_compile(mode: str, device: torch.device, zero_stage: int) -> None:
    """One-line ValueError for a ``pretrain.compile`` choice the device or ZeRO stage cannot run."""
    if mode == "deepcompile" and device.type != "cuda":
        raise ValueError(f"pretrain.compile=deepcompile needs a CUDA device (DeepCompile builds CUDA ops), not "
                         f"{device.type}; use pretrain.compile=inductor or none")
    if mode == "deepcompile" and zero_stage == 0:
        raise ValueError("pretrain.compile=deepcompile needs pretrain.zero_stage 1, 2 or 3, got 0")


def build_engine(model: torch.nn.Module, p: Any, *, world_size: int, device: torch.device, num_params: int,
                 universal: bool = False, settings_for: str | None = None) -> tuple[Any, dict]:
    """``deepspeed.initialize`` of ``model`` for pretrain config ``p``; returns (engine, DeepSpeed config), not yet
    compiled (:func:`compile_engine`). ``universal``: the checkpoint to be loaded is in DeepSpeed's universal format
    (an elastic resume). ``settings_for``: the device type whose DeepSpeed settings to use (default ``device``'s;
    ``benchmarks/step_overhead.py`` measures CUDA's on CPU)."""
    import deepspeed

    cfg = deepspeed_config(p, world_size=world_size, device=settings_for or device.type, num_params=num_params,
                           client_optimizer=True)
    stage = cfg["zero_optimization"]["stage"]
    check_compile(p.compile, device, stage)
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    clips = optimizer_clips(stage, "bf16" if cfg["bf16"]["enabled"] else "fp32")
    opt = ClippedAdamW(param_groups(model, p.weight_decay), lr=scaled_lr(p), betas=tuple(p.betas), eps=p.eps,
                       max_norm=p.grad_clip if clips else 0.0)
    if stage == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from vitpipe.models.layers import Block

        # One parameter fetch and release per transformer block instead of one per Linear / LayerNorm inside it:
        # a tenth of ZeRO-3's per-module hooks (DeepSpeed's remedy for "excessively fine-grained nested modules").
        set_z3_leaf_modules(model, [Block])
    engine = deepspeed.initialize(model=model, optimizer=opt, config=cfg)[0]
    if clips and stage in (1, 2):
        zero = engine.optimizer
        if not hasattr(zero, "_global_grad_norm"):
            raise RuntimeError(f"DeepSpeed {deepspeed.__version__}: its ZeRO-{stage} optimizer "
                               f"({type(zero).__name__}) no longer exposes _global_grad_norm; vitpipe's clipping "
                               "reads it (jobs/train/adamw.py)")
        # DeepSpeed's ZeRO-1/2 step computes the global norm over every group and rank, then calls the client
        # optimizer once per group: each call clips by that one norm.
        opt.global_norm = lambda: zero._global_grad_norm
        if install_foreach_norm(zero) and cfg["bf16"]["enabled"]:
            overflow_by_norm(zero)
    return engine, cfg


def install_foreach_norm(zero: Any) -> bool:
    """Give DeepSpeed's ZeRO-1/2 optimizer a global gradient norm of the same value computed with one
    ``torch._foreach_norm`` per parameter group and one all-reduce, instead of an fp64 cast, a norm kernel and a
    device move per parameter tensor and an all-reduce per group (measured: the largest per-tensor host cost of its
    step). Only where its norm is the plain L2 norm of ``averaged_gradients`` (no offload, MoE, Muon or model
    parallelism); returns whether it was installed. tests/jobs/test_engine.py compares it with DeepSpeed's."""
    import torch.distributed as dist

    plain = (not getattr(zero, "cpu_offload", True) and not getattr(zero, "has_moe_layers", True)
             and getattr(zero, "model_parallel_group", None) is None
             and not any(getattr(zero, "_is_muon_group", lambda _: False)(g) for g in zero.bit16_groups)
             and hasattr(zero, "averaged_gradients"))
    if not plain:
        return False
    device = zero.device

    def scaled_global_norm(norm_type: int = 2) -> torch.Tensor:
        assert norm_type == 2, "only L2 norm supported"
        squares = []
        for i in range(len(zero.bit16_groups)):
            grads = zero.averaged_gradients.get(i)
            flat = getattr(grads, "flat_partition", None)  # one buffer for the group's partition (bf16 runs)
            parts = [flat] if flat is not None else [g for g in grads or () if not getattr(g, "_zero_padding", False)]
            squares.append(torch.stack(torch._foreach_norm(parts, 2.0)).float().square().sum() if parts
                           else torch.zeros((), dtype=torch.float32, device=device))
        sq = torch.stack(squares)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=zero.dp_process_group)
        total = torch.linalg.vector_norm(sq.sqrt(), 2.0)
        # as DeepSpeed: a non-finite group norm makes the global norm +inf (the step is skipped)
        return torch.where(torch.isfinite(sq).all(), total, torch.full_like(total, float("inf")))

    zero.scaled_global_norm = scaled_global_norm
    return True


def overflow_by_norm(zero: Any) -> None:
    """bf16 ZeRO-1/2: let the finiteness check of the global gradient norm be the step's only overflow check.
    DeepSpeed otherwise first runs an inf/NaN kernel per gradient tensor, an all-reduce and a host read
    (``check_overflow``), then reads the norm's finiteness to the host as well: two device syncs per step. An inf or
    NaN anywhere makes :func:`install_foreach_norm`'s norm +inf on every rank, so DeepSpeed's own norm check (kept:
    ``bf16.check_grad_overflow``) skips the same steps (tests/jobs/test_step_syncs.py, bf16 cases)."""
    if not (zero.check_grad_overflow and zero.compute_grad_norm):
        raise RuntimeError("overflow_by_norm needs DeepSpeed's norm check (bf16.check_grad_overflow, compute_grad_norm)")

    def check_overflow(partition_gradients: bool = True) -> None:
        zero.overflow = False  # decided by the norm, next in DeepSpeed's step

    zero.check_overflow = check_overflow


def compile_engine(engine: Any, mode: str) -> None:
    """Apply ``pretrain.compile`` to a built engine: ``inductor`` is torch.compile of the module; ``deepcompile``
    the same plus DeepSpeed's graph passes (enabled in the engine's config by ``deepspeed_config``)."""
    if mode != "none":
        engine.compile()


_SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_fused_attention_overrideable": "fused (backend override)",
}


class _SdpaSeen(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func.overloadpacket.__name__
        if name in _SDPA_KERNELS:
            self.seen[name] = self.seen.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def attention_backend(vit: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> str:
    """The SDPA kernel ``vit`` runs for one image of its own size in ``dtype`` on ``device`` (observed at the ATen
    dispatch of an eager forward, not inferred from flags): e.g. ``flash``, ``cudnn``, ``memory-efficient``, or
    ``math`` when attention is computed without a fused kernel."""
    cfg = vit.cfg
    h, w = (cfg.img_size, cfg.img_size) if isinstance(cfg.img_size, int) else cfg.img_size
    x = torch.zeros(1, cfg.in_chans, h, w, device=device, dtype=dtype)
    mode = _SdpaSeen()
    with mode:
        vit(x)  # the module call (not forward_features): ZeRO-3 gathers parameters in module hooks
    if not mode.seen:
        return "math"
    return ", ".join(f"{_SDPA_KERNELS[k]}" for k in sorted(mode.seen))
