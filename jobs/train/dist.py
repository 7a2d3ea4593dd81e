"""Small collectives every rank calls at the same point of the loop (so they never deadlock)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU ones
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_floats(value: float) -> list[float]:
    """``value`` from every rank, in rank order (just ``[value]`` without a process group)."""
    if not dist.is_initialized():
        return [float(value)]
    t = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [float(o.item()) for o in out]

