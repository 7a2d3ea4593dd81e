"""What the pretraining loop logs every ``log_every`` steps: loss, accuracy, LR, throughput, MFU, and each rank's
peak memory (gathered to rank 0)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
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
    """``system/peak_mem_gb`` (GPU) or ``system/peak_rss_gb`` (CPU): the max over ranks, and ``<key>/rank{r}`` for
    every rank.
    Collective: call it on every rank at the same step."""
    peaks = gather_floats(peak_memory_gb(device))
    key = "system/peak_mem_gb" if device.type == "cuda" else "system/peak_rss_gb"
    return {key: max(peaks), **{f"{key}/rank{r}": v for r, v in enumerate(peaks)}}


@dataclass
class MetricWindow:
    """What the loop accumulates between two logging steps. Loss and accuracy stay on the device (adding them is
    queued like any kernel); :func:`log_window` reads them back once."""

    t0: float = field(default_factory=time.perf_counter)
    wait: float = 0.0
    """Seconds spent waiting for batches."""
    images: int = 0
    steps: int = 0
    """Optimizer steps counted in ``loss``."""
    n: int = 0
    """Micro-batches counted in ``acc``."""
    loss: torch.Tensor | None = None
    """Sum of the steps' mean losses (a 0-d device tensor)."""
    acc: torch.Tensor | None = None
    """Sum of the micro-batches' top-1 accuracies (a 0-d device tensor)."""

    def add(self, loss_sum: torch.Tensor, acc_sum: torch.Tensor, micro_batches: int, images: int) -> None:
        """One finished optimizer step: the sums of its micro-batches' losses and accuracies."""
        loss = loss_sum.detach().float() / micro_batches
        acc = acc_sum.detach().float()
        self.loss = loss if self.loss is None else self.loss + loss
        self.acc = acc if self.acc is None else self.acc + acc
        self.steps += 1
        self.n += micro_batches
        self.images += images

    def reset(self) -> None:
        self.__init__()


def log_window(tracker: Any, engine: Any, w: MetricWindow, fl: dict, p: PretrainConfig, world: int, step: int,
               epoch: int, extra: dict[str, float]) -> dict[str, float]:
    """Rank 0: the metrics of the window since the last log (plus ``extra``) to the tracker and the log; resets it.
    The one read-back of the window's device values (loss, accuracy, gradient norm) is one host sync."""
    dt = max(time.perf_counter() - w.t0, 1e-9)
    ips = w.images / dt
    gn = engine.get_global_grad_norm()
    dev = w.loss.device if w.loss is not None else torch.device("cpu")
    zero = torch.zeros((), device=dev)
    loss_sum, acc_sum, gnorm = torch.stack([
        w.loss if w.loss is not None else zero, w.acc if w.acc is not None else zero,
        torch.as_tensor(gn if gn is not None else float("nan"), dtype=torch.float32).to(dev).reshape(())]).tolist()
    m = {"train/loss": loss_sum / max(1, w.steps), "train/acc": acc_sum / max(1, w.n), "train/lr": engine.get_lr()[0],
         "train/images_per_s": ips, "train/tflops": ips * fl["train_flops"] / 1e12, "train/epoch": epoch,
         "train/data/wait_frac": w.wait / dt, **extra}
    if math.isfinite(gnorm):
        m["train/grad_norm"] = gnorm
    if p.peak_tflops:
        m["train/mfu"] = m["train/tflops"] / (p.peak_tflops * world)
    if tracker:
        tracker.metrics(m, step=step)
    eta = (p.steps - step) * p.global_batch / max(ips, 1e-9)
    log.info("pretrain step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f img/s data-wait %.0f%% eta %.0fs", step, p.steps,
             100 * step / p.steps, m["train/loss"], m["train/lr"], ips, 100 * m["train/data/wait_frac"], eta)
    w.reset()
    return m
