"""Fine-tuning worker (paper Appendix B.1.1): SGD momentum 0.9, no weight decay, clip 1, cosine with warmup,
optional Polyak averaging, at a new resolution with interpolated position embeddings. Data-parallel (DDP) across
Ray Train workers; the LR grid (held-out slice) and the final run happen in one worker group."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from typing import Any

import fsspec
import numpy as np
import torch
import torch.nn.functional as F

from vitpipe.jobs.configtools import from_dict
from vitpipe.jobs.tasks import make_task
from vitpipe.jobs.train.config import FinetuneConfig
from vitpipe.jobs.train.checkpoint import load_consolidated
from vitpipe.jobs.train.optim import top1
from vitpipe.models import ViTConfig, create, load_pretrained
from vitpipe.pipeline import ImageTransform

log = logging.getLogger("vitpipe.finetune")


def build_finetune_model(sd: dict, src: dict, img_size: int, num_classes: int) -> torch.nn.Module:
    """Pretrained weights at a new resolution (posemb resized from src's grid) with a fresh zero head."""
    src_cfg = ViTConfig.from_dict(src)
    dst_cfg = dataclasses.replace(src_cfg, img_size=img_size, num_classes=num_classes, dropout=0.0)
    model = create(dst_cfg)
    load_pretrained(model, sd, src_cfg, drop_head=True)
    model.reset_classifier(num_classes, drop_pre_logits=True)
    return model


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


def evaluate(model, task, split: str, indices: np.ndarray, img_size: int, batch: int, rank: int, world: int) -> float:
    """Accuracy over ``indices`` (each rank scores its strided share; counts all-reduced)."""
    tf = ImageTransform(img_size=img_size, train=False)
    mine = indices[rank::world]
    correct = torch.zeros(2)
    model.eval()
    with torch.inference_mode():
        for x, y in _batches(task, split, mine, tf, batch, None):
            correct[0] += model(x).argmax(-1).eq(y).sum()
            correct[1] += len(y)
    model.train()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(correct)
    return (correct[0] / correct[1].clamp_min(1)).item()


def train_one(model, task, indices: np.ndarray, f: Any, lr: float, steps: int, rank: int, world: int,
              tracker=None, seed: int = 0) -> tuple[torch.nn.Module, list[tuple[int, float]]]:
    """Fine-tune ``model`` (DDP-wrapped when distributed) for ``steps``; returns the (EMA) model and loss curve."""
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
    t0 = time.perf_counter()
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
                tracker.metrics({"loss": loss.item(), "lr": sched.get_last_lr()[0], "grad_norm": float(gn),
                                 "train_acc": top1(logits.detach(), y), "images_per_s": ips}, step=step)
                log.info("finetune lr=%g step %d/%d loss %.4f %.1f img/s", lr, step, steps, loss.item(), ips)
                t0 = time.perf_counter()
    return (ema if ema is not None else model), curve


def finetune_worker(spec: dict) -> None:
    """Ray Train entry: LR grid on a held-out slice, then the chosen LR on the full train split, test accuracy."""
    import ray.train


    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    f: FinetuneConfig = from_dict(FinetuneConfig, spec["finetune"])
    torch.set_num_threads(f.cpus_per_worker)
    task = make_task(f.task)
    sd, meta = load_consolidated(spec["pretrain_url"])
    tracker = _attach(spec) if rank == 0 else None

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
            model = build_finetune_model(sd, meta["config"], f.img_size, len(task.classes))
            child = tracker.child(f"lr={lr:g}", tags={"vitpipe.grid_point": "true"}) if tracker else None
            model, _ = train_one(model, task, fit, f, lr, f.grid_steps or f.steps, rank, world, child, f.seed)
            grid[lr] = evaluate(model, task, "train", hold, f.img_size, f.eval_batch_size, rank, world)
            if child:
                child.params({"lr": lr, "holdout_size": len(hold)})
                child.metrics({"holdout_acc": grid[lr]})
                child.finish()
        best_lr = max(grid, key=lambda k: (grid[k], -k))

    torch.manual_seed(f.seed)
    model = build_finetune_model(sd, meta["config"], f.img_size, len(task.classes))
    model, curve = train_one(model, task, train_idx, f, best_lr, f.steps, rank, world, tracker, f.seed)
    acc = evaluate(model, task, "test", test_idx, f.img_size, f.eval_batch_size, rank, world)
    metrics = {"test_acc": acc, "lr": best_lr, **{f"holdout_acc/lr_{k:g}": v for k, v in grid.items()}}
    if rank == 0:
        if tracker:
            tracker.metrics({"test_acc": acc, "chosen_lr": best_lr})
        with fsspec.open(f"{spec['out_url']}/finetune.json", "w") as fh:
            json.dump({"metrics": metrics, "curve": curve}, fh)
    ray.train.report(metrics)


def _attach(spec: dict):
    if not spec.get("mlflow_run_id"):
        return None
    from vitpipe.jobs.tracking import MlflowTracker

    return MlflowTracker.attach(spec["tracking_uri"], spec["mlflow_run_id"])
