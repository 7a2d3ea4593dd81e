"""Fine-tuning worker (paper Appendix B.1.1): SGD momentum 0.9, no weight decay, clip 1, cosine with warmup,
optional Polyak averaging, at a new resolution with interpolated position embeddings. Data-parallel (DDP) across
Ray Train workers; the LR grid (held-out slice) and the final run happen in one worker group."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from vitpipe.jobs.evals.taskspec import make_task
from vitpipe.jobs.train.checkpoint import load_consolidated
from vitpipe.jobs.train.config import FinetuneConfig
from vitpipe.jobs.train.consolidated import build_model
from vitpipe.jobs.train.optim import top1
from vitpipe.jobs.train.spec import FinetuneSpec
from vitpipe.pipeline import ImageTransform
from vitpipe.pipeline.tasks import VAL_SUFFIX

log = logging.getLogger("vitpipe.finetune")


def build_finetune_model(sd: dict, meta: dict, img_size: int, num_classes: int) -> torch.nn.Module:
    """Pretrained weights at a new resolution (posemb resized from the export's grid) with a fresh zero head, no
    dropout, in train mode."""
    model, _ = build_model(sd, meta, img_size=img_size, num_classes=num_classes, dropout=0.0)
    return model.train()


def cosine_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _batches(task, split: str, indices: np.ndarray, tf, batch: int, rng: np.random.Generator | None, seed: int = 0):
    """Endless (shuffled when rng is given) batches of (images, labels) from ``indices`` of ``task``; training
    augmentation is drawn per image from (seed, epoch, index), so a run is reproducible."""
    labels = np.asarray(task.train_labels if split == "train" else task.test_labels)
    epoch = 0
    while True:
        order = rng.permutation(indices) if rng is not None else indices
        for i in range(0, len(order) - batch + 1 if rng is not None else len(order), batch):
            idx = order[i:i + batch]
            ims = task.load(split, idx)
            if rng is not None:
                x = torch.stack([tf(im, np.random.default_rng([seed, epoch, int(j)])) for im, j in zip(ims, idx)])
            else:
                x = torch.stack([tf(im) for im in ims])
            yield x, torch.as_tensor(labels[idx], dtype=torch.long)
        if rng is None:
            return
        epoch += 1


def evaluate(model, task, split: str, indices: np.ndarray, img_size: int, batch: int, rank: int, world: int,
             report: Any = None) -> float:
    """Accuracy over ``indices`` (each rank scores its strided share; counts all-reduced). A pipeline task's images
    are decoded in its threads straight to uint8 batches (``task.batches``, as the few-shot features are), other
    tasks' one by one. ``report``: rank 0's progress sender (images scored, counted over all ranks)."""
    tf = ImageTransform(img_size=img_size, train=False)
    mine = indices[rank::world]
    correct = torch.zeros(2)
    batches = task.batches(split, mine, tf, batch) if hasattr(task, "batches") else \
        _batches(task, split, mine, tf, batch, None)
    model.eval()
    with torch.inference_mode():
        for x, y in batches:
            correct[0] += model(x).argmax(-1).eq(y).sum()
            correct[1] += len(y)
            if report is not None:
                report.send("step", step=min(len(indices), int(correct[1]) * world), total=len(indices),
                            unit="images", info=f"scoring {split}")
    model.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    return (correct[0] / correct[1].clamp_min(1)).item()


def train_one(model, task, indices: np.ndarray, f: Any, lr: float, steps: int, rank: int, world: int,
              tracker=None, seed: int = 0, report: Any = None) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Fine-tune ``model`` (DDP-wrapped when distributed) for ``steps``; returns the (EMA) model and loss curve.
    ``report``: rank 0's progress sender (step, loss, throughput every ``log_every`` steps)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = DDP(model) if torch.distributed.is_initialized() else model
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_warmup(s, steps, f.warmup_steps))
    ema = copy.deepcopy(model).eval() if f.ema_decay else None
    per_rank = max(1, f.batch_size // world)
    rng = np.random.default_rng([seed, rank])
    batches = _batches(task, "train", indices[rank::world], ImageTransform(img_size=f.img_size, train=True),
                       per_rank, rng, seed)
    curve = []
    t0 = t_start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = next(batches)
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(net.parameters(), f.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - f.ema_decay)
        if step % f.log_every == 0 or step == steps:
            curve.append((step, loss.item()))
            if tracker is not None:
                ips = f.batch_size * f.log_every / max(time.perf_counter() - t0, 1e-9)
                tracker.metrics({"train/loss": loss.item(), "train/lr": sched.get_last_lr()[0],
                                 "train/grad_norm": float(gn), "train/acc": top1(logits.detach(), y),
                                 "train/images_per_s": ips}, step=step)
                log.info("finetune lr=%g step %d/%d loss %.4f %.1f img/s", lr, step, steps, loss.item(), ips)
                t0 = time.perf_counter()
            if report is not None:
                per_step = (time.perf_counter() - t_start) / step
                report.send("step", step=step, total=steps, unit="steps", loss=loss.item(),
                            images_per_s=f.batch_size / max(per_step, 1e-9), eta_s=per_step * (steps - step))
    return (ema if ema is not None else model), curve


def finetune_worker(config: dict, progress: Any = None) -> None:
    """Ray Train entry (``config``: a :class:`FinetuneSpec` as a dict): LR grid on a held-out slice, then the chosen
    LR on the full train split, test accuracy. ``progress``: a ``ProgressSender`` rank 0 reports through."""
    import ray.train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = FinetuneSpec.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    tracker = spec.tracking.attach() if rank == 0 and spec.tracking else None
    with tracker.system_metrics() if tracker else contextlib.nullcontext():  # MLflow's CPU/memory/GPU sampling
        ray.train.report(finetune_rank(spec, rank, world, tracker, progress if rank == 0 else None))


def finetune_in_process(spec: FinetuneSpec, tracker: Any, report: Any = None) -> dict[str, float]:
    """A one-worker fine-tune in this process (no worker group to start): rank 0 of 1, as a Ray Train worker group
    of one would run it, with this process's torch threads put back afterwards."""
    threads = torch.get_num_threads()
    try:
        with tracker.system_metrics() if tracker is not None else contextlib.nullcontext():
            return finetune_rank(spec, 0, 1, tracker, report)
    finally:
        torch.set_num_threads(threads)


def finetune_rank(spec: FinetuneSpec, rank: int, world: int, tracker: Any, report: Any = None) -> dict[str, float]:
    """One rank's LR grid + final run; returns the stage's result metrics (rank 0 also writes finetune.json).
    ``report``: rank 0's progress sender (``vitpipe.jobs.train.progress``), None elsewhere."""
    f: FinetuneConfig = spec.finetune
    torch.set_num_threads(f.cpus_per_worker)
    task = make_task(f.task)
    sd, meta = load_consolidated(spec.pretrain_url)

    n = len(task.train_labels)
    perm = np.random.default_rng(f.seed).permutation(n)
    train_idx = np.sort(perm[: f.train_limit]) if f.train_limit else np.arange(n)
    test_idx = np.arange(len(task.test_labels))
    if f.test_limit and f.test_limit < test_idx.size:
        # a fixed random subset: folder tasks list the test split class by class
        test_idx = np.sort(np.random.default_rng(f.seed).choice(test_idx, f.test_limit, replace=False))

    grid: dict[float, float] = {}
    best_lr = f.lr_grid[0]
    if len(f.lr_grid) > 1:
        frac = f.holdout_fraction or (0.02 if len(train_idx) >= 20_000 else 0.10)
        cut = max(len(task.classes), int(round(frac * len(train_idx))))
        shuffled = np.random.default_rng(f.seed + 1).permutation(train_idx)
        hold, fit = np.sort(shuffled[:cut]), np.sort(shuffled[cut:])
        for lr in f.lr_grid:
            torch.manual_seed(f.seed)
            model = build_finetune_model(sd, meta, f.img_size, len(task.classes))
            child = tracker.child(f"lr={lr:g}", tags={"vitpipe.grid_point": "true"}) if tracker else None
            if report is not None:
                report.send("phase", text=f"lr grid: {lr:g}")
            model, _ = train_one(model, task, fit, f, lr, f.grid_steps or f.steps, rank, world, child, f.seed,
                                 report)
            grid[lr] = evaluate(model, task, "train", hold, f.img_size, f.eval_batch_size, rank, world, report)
            if child:
                child.params({"lr": lr, "holdout_size": len(hold)})
                child.metrics({f"eval/{task.name}{VAL_SUFFIX}/finetune": grid[lr]})
                child.finish()
        best_lr = max(grid, key=lambda k: (grid[k], -k))

    torch.manual_seed(f.seed)
    model = build_finetune_model(sd, meta, f.img_size, len(task.classes))
    t0 = time.perf_counter()
    model, curve = train_one(model, task, train_idx, f, best_lr, f.steps, rank, world, tracker, f.seed, report)
    t1 = time.perf_counter()
    acc = evaluate(model, task, "test", test_idx, f.img_size, f.eval_batch_size, rank, world, report)
    timing = {"train_s": t1 - t0, "test_s": time.perf_counter() - t1}  # where the stage's time goes (demo_time)
    log.info("finetune: %d steps in %.1fs, %d test images scored in %.1fs", f.steps, timing["train_s"],
             len(test_idx), timing["test_s"])
    # the stage run gets these once, from the stage's result (jobs.core.metric_names)
    metrics = {f"eval/{task.name}/finetune": acc, "train/chosen_lr": best_lr,
               **{f"eval/{task.name}{VAL_SUFFIX}/finetune_lr_{k:g}": v for k, v in grid.items()}}
    if rank == 0:
        with fsspec.open(f"{spec.out_url}/finetune.json", "w") as fh:
            json.dump({"metrics": metrics, "curve": curve, "task": task.name, "timing": timing}, fh)
    return metrics

