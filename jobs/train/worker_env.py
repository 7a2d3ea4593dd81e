"""What a training worker process sets up before it trains, and what the driver sets for its workers.

- No DeepSpeed op build. DeepSpeed's comm backend JIT-compiles its shared-memory op (``deepspeed_shm_comm``: two
  C++ files, ~40-60 s on 2 cores, redone on every machine with an empty ``TORCH_EXTENSIONS_DIR``) when a process
  group starts, but only its ``inference_all_reduce`` (tensor-parallel inference) uses it; ZeRO's collectives go
  through ``torch.distributed``. :func:`no_deepspeed_op_build` marks the op unavailable, so training needs no build.
- The lines a person never needs, dropped at their source (each matched by its logger and text, nothing broader):
  DeepSpeed's "Attempting to get learning rate from scheduler before it has started" (its WarmupLR asks itself in
  its own constructor) and Ray Train's per-report ``TrainingReport(...)`` dump. DeepSpeed's "Setting accelerator to
  CPU" is avoided by naming the accelerator (``DS_ACCELERATOR``, :func:`worker_env_vars`); Ray Train's
  PreemptionWatcher (whose actor Ray's core logs an error line about) is not started for a single-machine head,
  whose preemption would end the driver too (:func:`local_head_train_env`).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

__all__ = ["DropMessages", "keep_freed_memory_mapped", "local_head_train_env", "no_deepspeed_op_build",
           "prepare_worker", "quiet_worker", "train_entry", "worker_env_vars"]

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

# (logger, start of the message) of each line dropped in a training worker; a module name stands for the logger the
# module logs through (Ray Train's context module names its logger after its file path, not its module)
NOISE: tuple[tuple[str, str], ...] = (
    ("DeepSpeed", "Attempting to get learning rate from scheduler before it has started"),
    ("ray.train.v2._internal.execution.context", "Reporting training result"),
)


class DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def noise_loggers(name: str) -> list[logging.Logger]:
    """The logger ``name``, and the one module ``name`` logs through when that is another (its ``logger``)."""
    out = [logging.getLogger(name)]
    if name.startswith("ray."):
        import importlib

        try:
            own = getattr(importlib.import_module(name), "logger", None)
        except ImportError:
            own = None
        if isinstance(own, logging.Logger) and own not in out:
            out.append(own)
    return out


def quiet_worker() -> None:
    """Attach the :data:`NOISE` filters to their loggers (idempotent). Filters live on the logger objects, so they
    survive DeepSpeed's and Ray Train's own logging setup (which replaces handlers, not filters)."""
    for name, prefix in NOISE:
        for logger in noise_loggers(name):
            if not any(isinstance(f, DropMessages) and prefix in f.prefixes for f in logger.filters):
                logger.addFilter(DropMessages(prefix))


def no_deepspeed_op_build() -> None:
    """Mark DeepSpeed's shared-memory comm op unavailable in this process (module docstring), before
    ``deepspeed.initialize``; a no-op where DeepSpeed is not installed."""
    try:
        import deepspeed.ops
    except ImportError:
        return
    # DeepSpeed probes op compatibility once per process and keeps the dict (its comment: edits to it persist);
    # build_shm_op() returns None for an op marked incompatible, and the backend then uses torch.distributed alone.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keep_freed_memory_mapped() -> bool:
    """This process's share of ``raytools.MALLOC_ENV``, set at run time: glibc keeps freed blocks up to 1 GiB mapped
    instead of returning activation-sized buffers to the OS and page-faulting them back at every batch (the
    workers get it through their environment; the driver, which embeds features and may fine-tune in-process,
    through ``mallopt``). Measured on a loaded 2-core EPYC, 2048 CIFAR-10 test images through the demo ViT, three
    fresh-process pairs: 90/102/99 -> 106/119/141 img/s. Returns whether it applied (glibc only)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def prepare_worker(deepspeed: bool = False) -> None:
    """Everything above, for a training worker process; ``deepspeed``: the worker trains with DeepSpeed (only then
    is DeepSpeed imported here: a DDP worker would pay its import and its accelerator warning for nothing)."""
    quiet_worker()
    if deepspeed:
        no_deepspeed_op_build()


def train_entry(fn: Callable[..., Any], config: dict, *, deepspeed: bool = False, **kwargs: Any) -> Any:
    """Ray Train entry that prepares the worker (``prepare_worker(deepspeed)``), then runs ``fn(config,
    **kwargs)``; bind ``fn`` and the keywords with ``functools.partial`` (Ray Train counts one required argument,
    ``config``)."""
    prepare_worker(deepspeed)
    return fn(config, **kwargs)


def worker_env_vars(use_gpu: bool) -> dict[str, str]:
    """Environment for DeepSpeed training workers: the accelerator named, so DeepSpeed does not guess and warn."""
    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu"}


def local_head_train_env() -> None:
    """On a single-machine Ray head (every node on loopback, as ``ensure_ray`` starts it): no PreemptionWatcher
    for Ray Train's worker groups (module docstring). Ray Train propagates the variable from this process to its
    controller; an explicit setting is kept. Call after ``ensure_ray``."""
    import ray

    if PREEMPTION_WATCHER_ENV in os.environ or not ray.is_initialized():
        return
    try:
        address = ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - unknown: leave Ray Train's default
        return
    if str(address).startswith(("127.0.0.1:", "localhost:")):
        os.environ[PREEMPTION_WATCHER_ENV] = "0"
