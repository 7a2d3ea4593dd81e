"""The pretraining optimizer: torch's fused AdamW (one kernel over every tensor it holds, on CUDA and on CPU) that
clips by the global gradient norm on the device, so that a step never waits for the device to report a norm.

DeepSpeed hands its client optimizer the flat fp32 partitions of each parameter group (ZeRO-1/2/3) or the module's
own parameters (ZeRO-0 in fp32), and calls ``step()`` once per group. The global norm therefore comes from where it
is whole: ``global_norm`` (set by :func:`vitpipe.jobs.train.engine.build_engine` for ZeRO-1/2: the norm DeepSpeed's
ZeRO optimizer has just computed over every group and rank, before it calls this optimizer), or, when no such source
exists and this optimizer holds every gradient itself (ZeRO-0), its own gradients. Clipping is the fused kernel's
``grad_scale`` (every gradient divided by ``max(1, (norm + 1e-6) / max_norm)``, as ``clip_grad_norm_``).

A non-finite norm means a non-finite loss or gradient on some rank. DeepSpeed's ZeRO optimizers then skip the update
themselves (they check the norm they compute, one host read per step) and never call this optimizer; in the ZeRO-0
case this optimizer does the same check and reports it through ``overflow``, the attribute DeepSpeed's engine reads
to count a skipped step (``engine.skipped_steps``) and leave the LR schedule where it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class ClippedAdamW(torch.optim.AdamW):
    """Fused AdamW with global-norm clipping on the device (``max_norm`` 0: no clipping).

    ``global_norm``: returns the global gradient norm (a 0-d tensor on the parameters' device) when this optimizer
    sees only part of the gradients; None: the norm of the gradients it holds (and the non-finite check).
    """

    def __init__(self, params: Iterable[Any], *, max_norm: float = 0.0, **adamw: Any):
        super().__init__(params, fused=True, **adamw)
        self.max_norm = float(max_norm)
        self.global_norm: Callable[[], torch.Tensor] | None = None
        self.overflow = False
        self.last_norm: torch.Tensor | None = None
        """The norm the last step clipped by (a device tensor; read it only when logging)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        if self.max_norm <= 0:
            return super().step(closure)
        if self.global_norm is not None:
            norm = self.global_norm()
        else:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if not grads:
                return super().step(closure)
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            # The one host read of a ZeRO-0 step; DeepSpeed's ZeRO optimizers make the same check themselves.
            self.overflow = not bool(torch.isfinite(norm))
            self._global_grad_norm = norm  # what DeepSpeed's engine reports as get_global_grad_norm()
            if self.overflow:
                for g in self.param_groups:
                    for p in g["params"]:
                        p.grad = None
                return None
        self.last_norm = norm
        # the fused kernel divides every gradient by grad_scale (the protocol GradScaler uses)
        self.grad_scale = torch.clamp((norm.float() + 1e-6) / self.max_norm, min=1.0)
        try:
            return super().step(closure)
        finally:
            del self.grad_scale

    def load_state_dict(self, state_dict: dict) -> None:
        """A checkpoint written by another AdamW (DeepSpeed's torch path, unfused) resumes on the fused kernel."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group["fused"], group["foreach"] = True, None
            for p in group["params"]:
                st = self.state.get(p)
                if st and torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
