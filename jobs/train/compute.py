"""Compute planning: what a recipe's training stages cost before they run (``vitpipe plan``).

Per training stage: parameters, training FLOPs (images seen x 6 x forward MACs per image, i.e. model FLOPs, the
numerator of MFU), per-GPU memory for each ZeRO stage, and wall-clock / GPU-hours at an assumed MFU.

Memory model (mixed precision with Adam, ZeRO paper, Rajbhandari et al. 2020, §3): 2 bytes/param of bf16 weights,
2 of bf16 gradients, 12 of fp32 optimizer state (master weights, m, v) = 16 bytes/param. ZeRO-1 shards the 12,
ZeRO-2 also the gradients, ZeRO-3 also the weights, over the data-parallel ranks N. In fp32 (no master copy) it is
4 + 4 + 8 = 16 bytes/param too, sharded the same way.

Activations per transformer block and sample, kept for backward (Korthikanti et al. 2022, "Reducing activation
recomputation", §4.1, without dropout masks, with fused attention (SDPA) so the s x s scores are not stored):
LN1 input, QKV input, Q, K, V, attention output, LN2 input, fc1 input = 8 s·h elements, plus fc1 output and GELU
output = 2 s·M. With activation checkpointing only each block's input (s·h) is kept, plus one block's full set
during its recomputation. Allocator fragmentation and communication buffers come on top (keep ~10% headroom).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rich.table import Table

from vitpipe.jobs.core.configtools import ConfigError
from vitpipe.jobs.train.ds_config import default_zero_stage
from vitpipe.models import ViTConfig, flops

if TYPE_CHECKING:
    from vitpipe.jobs.config import PipelineConfig

# Dense (not sparse) bf16 peaks in TFLOP/s and memory in GiB per device.
ACCELERATORS: dict[str, tuple[float, float]] = {
    "H100": (989.0, 80.0), "H200": (989.0, 141.0), "A100": (312.0, 80.0), "A100-40GB": (312.0, 40.0),
}
HEADROOM = 0.9  # usable fraction of device memory (fragmentation, NCCL buffers, CUDA context)
GIB = 1 << 30


@dataclass(kw_only=True, frozen=True)
class Gpus:
    """A homogeneous accelerator pool, e.g. ``256xH100``."""

    count: int
    """Number of devices (data-parallel ranks)."""
    kind: str
    """Key of ACCELERATORS."""

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"GPU count must be >= 1, got {self.count}")
        if self.kind not in ACCELERATORS:
            raise ConfigError(f"unknown accelerator '{self.kind}' (known: {', '.join(ACCELERATORS)})")

    @property
    def peak_flops(self) -> float:
        return ACCELERATORS[self.kind][0] * 1e12

    @property
    def memory_bytes(self) -> float:
        return ACCELERATORS[self.kind][1] * GIB


def parse_gpus(text: str) -> Gpus:
    """``"256xH100"`` -> Gpus(count=256, kind="H100"); one clear ValueError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*([A-Za-z0-9-]+)\s*", text)
    if not m:
        raise ConfigError(f"bad --gpus '{text}': expected COUNTxKIND, e.g. 256xH100")
    kind = next((k for k in ACCELERATORS if k.lower() == m[2].lower()), m[2])
    return Gpus(count=int(m[1]), kind=kind)


def state_bytes(params: int, zero_stage: int, world: int) -> dict[str, float]:
    """Per-device bytes of weights, gradients and optimizer state (16 bytes/param before sharding)."""
    w, g, o = 2.0 * params, 2.0 * params, 12.0 * params
    if zero_stage >= 1:
        o /= world
    if zero_stage >= 2:
        g /= world
    if zero_stage >= 3:
        w /= world
    return {"weights": w, "grads": g, "optimizer": o, "total": w + g + o}


def activation_bytes(model: ViTConfig, micro_batch: int, *, checkpointing: bool, bytes_per_el: int = 2,
                     img_size: int | None = None) -> float:
    """Activations kept for backward on one device for one micro-batch (see the module docstring)."""
    cfg = model.replace(img_size=img_size) if img_size else model
    s, h, m, layers = cfg.seq_len, cfg.width, cfg.mlp_dim, cfg.depth
    per_block = s * (8 * h + 2 * m)
    per_sample = (layers * s * h + per_block) if checkpointing else layers * per_block
    return float(per_sample * micro_batch * bytes_per_el)


@dataclass
class StageCompute:
    """The cost of one training stage on a GPU pool."""

    stage: str
    params: int
    images: int
    train_flops: float
    flops_per_image: float
    micro_batch: int
    accumulation: float
    zero_stage: int
    memory: dict[int, dict[str, float]] = field(default_factory=dict)  # zero stage -> components (bytes)
    activations: dict[bool, float] = field(default_factory=dict)  # checkpointing -> bytes
    wall_s: float = 0.0
    gpu_hours: float = 0.0
    notes: list[str] = field(default_factory=list)

    def fits(self, zero_stage: int, checkpointing: bool, device_bytes: float) -> bool:
        return self.memory[zero_stage]["total"] + self.activations[checkpointing] <= HEADROOM * device_bytes


@dataclass
class ComputePlan:
    gpus: Gpus
    mfu: float
    stages: list[StageCompute]
    problems: list[str] = field(default_factory=list)
    """Stages that could not be planned, with the reason (the config would fail there too)."""

    @property
    def total_flops(self) -> float:
        return sum(s.train_flops for s in self.stages)

    @property
    def wall_s(self) -> float:
        return sum(s.wall_s for s in self.stages)

    @property
    def gpu_hours(self) -> float:
        return sum(s.gpu_hours for s in self.stages)


def _stage(name: str, model: ViTConfig, images: int, micro: int, global_batch: int, zero: int | None, precision: str,
           gpus: Gpus, mfu: float, img_size: int | None = None) -> StageCompute:
    f = flops(model, img_size=img_size)
    params = f["params"]
    zero = default_zero_stage(params) if zero is None else zero
    bpe = 4 if precision == "fp32" else 2
    per_step = micro * gpus.count
    sc = StageCompute(stage=name, params=params, images=images, train_flops=float(images) * f["train_flops"],
                      flops_per_image=float(f["train_flops"]), micro_batch=micro,
                      accumulation=global_batch / per_step, zero_stage=zero)
    sc.memory = {z: state_bytes(params, z, gpus.count) for z in range(4)}
    sc.activations = {c: activation_bytes(model, micro, checkpointing=c, bytes_per_el=bpe, img_size=img_size)
                      for c in (False, True)}
    sc.wall_s = sc.train_flops / (gpus.count * gpus.peak_flops * mfu)
    sc.gpu_hours = sc.wall_s * gpus.count / 3600.0
    if global_batch < per_step:
        sc.notes.append(f"micro_batch {micro} x {gpus.count} GPUs = {per_step} exceeds the global batch "
                        f"{global_batch}: lower the micro batch to {max(1, global_batch // gpus.count)} or use "
                        f"fewer GPUs")
    elif global_batch % per_step:
        sc.notes.append(f"global batch {global_batch} is not a multiple of micro_batch x GPUs = {per_step}")
    if not sc.fits(zero, False, gpus.memory_bytes):
        ok = [f"ZeRO-{z}{' + act. ckpt' if c else ''}" for c in (False, True) for z in range(4)
              if sc.fits(z, c, gpus.memory_bytes)]
        fits = ", ".join(ok) or "none (use a smaller micro batch)"
        sc.notes.append(f"ZeRO-{zero} does not fit {gpus.kind} memory; fits: {fits}")
    return sc


def plan_compute(cfg: PipelineConfig, gpus: Gpus, mfu: float = 0.4) -> ComputePlan:
    """Cost of ``cfg``'s training stages (pretrain, finetune incl. its LR grid) on ``gpus`` at ``mfu``."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    stages: list[StageCompute] = []
    problems: list[str] = []
    p = cfg.pretrain
    precision = "bf16" if p.precision == "auto" else p.precision
    if "pretrain" in cfg.stages:
        stages.append(_stage("pretrain", cfg.model, p.steps * p.global_batch, p.micro_batch, p.global_batch,
                             p.zero_stage, precision, gpus, mfu))
    if "finetune" in cfg.stages:
        ft = cfg.finetune
        grid = len(ft.lr_grid) * (ft.grid_steps or ft.steps) if len(ft.lr_grid) > 1 else 0
        # Fine-tuning drops the pre-logits and replaces the head; its cost is the backbone at the new resolution.
        model = cfg.model.replace(representation_size=None)
        micro = max(1, ft.batch_size // gpus.count)
        try:
            sc = _stage("finetune", model, (grid + ft.steps) * ft.batch_size, micro, ft.batch_size, 0, precision,
                        gpus, mfu, img_size=ft.img_size)
        except ValueError as e:  # e.g. a fine-tune resolution that is not a multiple of the patch size
            problems.append(f"finetune not planned: {e}")
        else:
            if grid:
                sc.notes.append(f"includes the LR grid: {len(ft.lr_grid)} x {ft.grid_steps or ft.steps} steps")
            stages.append(sc)
    return ComputePlan(gpus=gpus, mfu=mfu, stages=stages, problems=problems)


def _si(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _gib(b: float) -> str:
    return f"{b / GIB:.1f}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 2 * 3600:
        return f"{s / 60:.0f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def compute_tables(est: ComputePlan) -> list[Any]:
    """Rich renderables: compute and memory per training stage, then notes and problems."""
    g = est.gpus
    comp = Table(title=f"compute on {g.count}x{g.kind} ({ACCELERATORS[g.kind][0]:g} TFLOP/s bf16 peak) at "
                       f"MFU {est.mfu:g}")
    for col in ("stage", "params", "images", "FLOP/img", "FLOPs", "μb×acc", "wall", "GPU-h"):
        comp.add_column(col, justify="right")
    for s in est.stages:
        comp.add_row(s.stage, f"{s.params / 1e6:,.1f}M", f"{s.images:,}", _si(s.flops_per_image),
                     _si(s.train_flops), f"{s.micro_batch}×{s.accumulation:g}", _duration(s.wall_s),
                     f"{s.gpu_hours:,.0f}")
    comp.add_row("total", "", "", "", _si(est.total_flops), "", _duration(est.wall_s), f"{est.gpu_hours:,.0f}")
    mem = Table(title=f"per-GPU memory, GiB ({ACCELERATORS[g.kind][1]:g} GiB device; states = 16 B/param sharded "
                      f"over {g.count} ranks; + activations of one micro batch)")
    for col in ("stage", "ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3", "act.", "act.ckpt", "cfg"):
        mem.add_column(col, justify="right")
    for s in est.stages:
        cells = []
        for z in range(4):
            ok = s.fits(z, False, g.memory_bytes) or s.fits(z, True, g.memory_bytes)
            cells.append(f"[{'green' if ok else 'red'}]{_gib(s.memory[z]['total'])}[/]")
        mem.add_row(s.stage, *cells, _gib(s.activations[False]), _gib(s.activations[True]), f"Z{s.zero_stage}")
    notes = [f"[yellow]note[/] {s.stage}: {n}" for s in est.stages for n in s.notes]
    notes += [f"[red]problem[/] {p}" for p in est.problems]
    return [comp, mem, *notes]
