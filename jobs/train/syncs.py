"""Counting the host reads of device values (the points where a CUDA host thread would wait for the device) in a
block of code, on any device: every ``aten::_local_scalar_dense`` (``.item()``, ``float()``, ``bool()``, ``int()``
of a tensor, ``if tensor:``) at the ATen dispatch, plus ``Tensor.tolist()`` and ``Tensor.numpy()`` calls (which
read memory directly on CPU, so the dispatcher never sees them). Used by ``tests/jobs/test_step_syncs.py`` and
``benchmarks/step_overhead.py``.

    with HostSyncCounter() as c:
        trainer.step()
    c.count, c.where.most_common(3)

Boolean-mask indexing (``x[mask]``) also waits for the device on CUDA (the output size); on CPU it is not counted.
"""

from __future__ import annotations

import collections
import os
import traceback
from types import TracebackType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class HostSyncCounter(TorchDispatchMode):
    """Counts host reads in its block; ``where`` counts them by the innermost call site outside torch."""

    def __init__(self, where: bool = True) -> None:
        super().__init__()
        self.count = 0
        self.track = where
        self.where: collections.Counter[str] = collections.Counter()
        self._saved: list[tuple[str, Any]] = []

    def _hit(self) -> None:
        self.count += 1
        if self.track:
            frames = [f for f in traceback.extract_stack()[:-2] if f"{os.sep}torch{os.sep}" not in f.filename]
            f = frames[-1] if frames else None
            self.where[f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" if f else "?"] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self._hit()
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostSyncCounter:
        for name in ("tolist", "numpy"):
            orig = getattr(torch.Tensor, name)
            self._saved.append((name, torch.Tensor.__dict__.get(name)))

            def counted(t: torch.Tensor, *a: Any, _orig: Any = orig, **k: Any) -> Any:
                self._hit()
                return _orig(t, *a, **k)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for name, own in self._saved:
            if own is None:
                delattr(torch.Tensor, name)  # it was inherited from TensorBase
            else:
                setattr(torch.Tensor, name, own)
        self._saved = []
        return super().__exit__(exc_type, exc, tb)
