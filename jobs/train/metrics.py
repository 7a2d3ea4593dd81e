"""What the pretraining loop logs every ``log_every`` steps: loss, accuracy, LR, throughput, MFU, and each rank's
peak memory (gathered to rank 0)."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.dist import gather_floats

log = logging.getLogger("vitpipe.pretrain")


def peak_memory_gb(device: torch.device) -> float:
    """This process's peak so far: CUDA ``max_memory_allocated`` on GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def memory_metrics(device: torch.device) -> dict[str, float]:
    """``peak_mem_gb`` (GPU) or ``peak_rss_gb`` (CPU): the max over ranks, and ``<key>/rank{r}`` for every rank.
    Collective: call it on every rank at the same step."""
    peaks = gather_floats(peak_memory_gb(device))
    key = "peak_mem_gb" if device.type == "cuda" else "peak_rss_gb"
    return {key: max(peaks), **{f"{key}/rank{r}": v for r, v in enumerate(peaks)}}


def log_window(tracker: Any, engine: Any, w: dict, fl: dict, p: PretrainConfig, world: int, step: int,
               epoch: int, extra: dict[str, float]) -> dict[str, float]:
    """Rank 0: the metrics of the window since the last log (plus ``extra``) to the tracker and the log; resets it."""
    dt = max(time.perf_counter() - w["t0"], 1e-9)
    n_steps = max(1, w["images"] // p.global_batch)
    ips = w["images"] / dt
    gn = engine.get_global_grad_norm()
    m = {"loss": w["loss"] / n_steps, "train_acc": w["acc"] / max(1, w["n"]), "lr": engine.get_lr()[0],
         "images_per_s": ips, "tflops": ips * fl["train_flops"] / 1e12,
         "data_wait_frac": w["wait"] / dt, "epoch": epoch, **extra}
    if gn is not None and math.isfinite(float(gn)):
        m["grad_norm"] = float(gn)
    if p.peak_tflops:
        m["mfu"] = m["tflops"] / (p.peak_tflops * world)
    if tracker:
        tracker.metrics(m, step=step)
    eta = (p.steps - step) * p.global_batch / max(ips, 1e-9)
    log.info("pretrain step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f img/s data-wait %.0f%% eta %.0fs", step, p.steps,
             100 * step / p.steps, m["loss"], m["lr"], ips, 100 * m["data_wait_frac"], eta)
    w.update(t0=time.perf_counter(), wait=0.0, images=0, loss=0.0, acc=0.0, n=0)
    return m
