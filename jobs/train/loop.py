"""The pretraining loop run by every Ray Train worker: DeepSpeed engine + the rank's share of the shard stream."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
import warnings
from typing import Any

import torch

from vitpipe.jobs.configtools import from_dict
from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train import ckpt_store
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.debug import Debug
from vitpipe.jobs.train.dist import all_finite
from vitpipe.jobs.train.ds_config import accumulation_steps, deepspeed_config, scaled_lr
from vitpipe.jobs.train.metrics import log_window, memory_metrics
from vitpipe.jobs.train.optim import classification_loss, param_groups, top1
from vitpipe.models import ViTConfig, create, flops
from vitpipe.models.mpp import MaskedPatchPrediction
from vitpipe.pipeline import ShardStream

log = logging.getLogger("vitpipe.pretrain")


def pretrain_worker(spec: dict) -> None:
    """Ray Train entry point. ``spec``: model/pretrain config dicts, manifest and output URLs, tracking ids."""
    import deepspeed
    import ray.train
    import ray.train.torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # DeepSpeed's ZeRO step calls all_gather_into_tensor, deprecated since torch 2.13: a FutureWarning per rank and
    # step would bury the progress lines (Ray prints each worker's stderr).
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p: PretrainConfig = from_dict(PretrainConfig, spec["pretrain"])
    mcfg = ViTConfig.from_dict(spec["model"])
    torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")
    debug = Debug(spec, rank)  # test hooks: fault injection, sample-key and weight recording

    torch.manual_seed(p.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    vit = create(mcfg)
    if p.activation_checkpointing:
        vit.set_grad_checkpointing(True)
    mpp = p.objective == "mpp"
    model = MaskedPatchPrediction(vit) if mpp else vit
    num_params = sum(t.numel() for t in model.parameters())
    ds_cfg = deepspeed_config(p, world_size=world, device=device.type, num_params=num_params)
    ckpt.allow_deepspeed_globals()
    restored = ray.train.get_checkpoint()
    resume = contextlib.ExitStack()  # a downloaded or converted checkpoint is kept until it is loaded
    resume_dir = _resume_dir(resume, restored, world, rank, ds_cfg) if restored is not None else None
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, p.weight_decay),
                                           config=ds_cfg)
    bf16 = ds_cfg["bf16"]["enabled"]
    accum = accumulation_steps(p.global_batch, p.micro_batch, world)

    scfg = from_dict(type(p.stream), {**spec["pretrain"]["stream"], "batch_size": p.micro_batch,
                                       "seed": p.seed})
    stream = ShardStream(spec["manifest_url"], scfg, rank=rank, world_size=world)
    tracker = _tracker(spec) if rank == 0 else None

    state = {"step": 0, "skipped_nonfinite": 0, "rollbacks": 0}
    if resume_dir is not None:
        client = ckpt.load(engine, resume_dir)
        state.update(client["trainer"])
        stream.load_state_dict(client["stream"])
        torch.set_rng_state(client["rng_cpu"])
        log.info("rank %d resumed at step %d", rank, state["step"])
        if debug.get("record_keys") and rank == 0:
            debug.record_keys("resume", state["step"], [])
    resume.close()

    fl = flops(mcfg)
    if rank == 0:
        info = {"world_size": world, "micro_batch": p.micro_batch, "accumulation_steps": accum,
                "global_batch": p.global_batch, "scaled_lr": scaled_lr(p), "zero_stage":
                ds_cfg["zero_optimization"]["stage"], "precision": "bf16" if bf16 else "fp32",
                "num_params": num_params, "batches_per_epoch": stream.batches_per_epoch(),
                "checkpoint_upload": p.checkpoint_upload}
        log.info("pretrain: %s", ", ".join(f"{k}={v}" for k, v in info.items()))
        if tracker:
            tracker.params({"resolved": info})

    batches = _batch_iter(stream)
    window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0, "loss": 0.0, "acc": 0.0, "n": 0}
    last_metrics: dict[str, float] = {}
    fresh = restored is None  # no checkpoint folder of this run can exist at a later step (ckpt_store.checkpoint_name)
    step_keys: list[str] = []
    while state["step"] < p.steps:
        losses: list[float] = []
        nonfinite = False
        for micro in range(accum):
            t_wait = time.perf_counter()
            x, y, keys = next(batches)
            window["wait"] += time.perf_counter() - t_wait
            if debug.get("record_keys"):
                step_keys.extend(keys)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if bf16:
                x = x.to(torch.bfloat16)
            if mpp:  # corruption randomness from (seed, step, rank, micro-batch): identical after a resume
                g = torch.Generator(device=device).manual_seed(
                    ((p.seed * 1_000_003 + state["step"]) * 1_009 + rank) * 101 + micro)
                loss, acc = engine(x, g)
            else:
                logits = engine(x)
                loss = classification_loss(logits, y, p.loss)
            if not all_finite(debug.nan(loss, state["step"] + 1, micro)):
                # Skip the batch before it touches the weights, then roll back (paper-scale runs hit the odd bad
                # batch / loss spike and must neither die nor silently diverge); bounded, so a diverged run fails.
                nonfinite = True
                _count_nonfinite(state, p, rank, micro)
                if micro > 0:  # DeepSpeed holds this step's first gradients: close its accumulation window
                    for _ in range(micro, accum):
                        _null_pass(engine, x, mpp, device)
                break
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            window["acc"] += acc.item() if mpp else top1(logits.detach(), y)
            window["n"] += 1
        if nonfinite:
            client = ckpt_store.rollback(engine, before_verify=debug.damage)
            if client is not None:
                # The engine is back at the checkpoint (weights, optimizer, LR schedule, its step count), and so is
                # the trainer's step; the counters keep counting. The data stream and RNG move on: the offending
                # batch and those after the checkpoint are not replayed (as PaLM's restarts skip batches).
                state["step"] = client["trainer"]["step"]
                state["rollbacks"] += 1
                fresh = False
                if rank == 0:
                    log.warning("rolled back to step %d (rollback %d)", state["step"], state["rollbacks"])
                debug.record_weights(engine, "rollback", state["step"])
                step_keys = []
                continue
            if not losses:  # nothing reached DeepSpeed: this step never happened
                step_keys = []
                continue
            # else no checkpoint yet: the finite micro-batches made this step's update, which counts as a step
        state["step"] += 1
        step = state["step"]
        if debug.get("record_keys"):
            debug.record_keys(rank, step, step_keys)
        step_keys = []
        window["images"] += p.global_batch
        window["loss"] += sum(losses) / len(losses)
        if step % p.log_every == 0 or step == p.steps:
            mem = memory_metrics(device)  # collective: every rank, at the same step
            if rank == 0:
                last_metrics = log_window(tracker, engine, window, fl, p, world, step,
                                          stream.state_dict()["epoch"], mem)
        if step % p.checkpoint_every == 0 or step == p.steps:
            client = {"trainer": dict(state), "stream": stream.state_dict(), "rng_cpu": torch.get_rng_state()}
            ckpt_store.save_and_report(engine, step, rank, world, client, {**last_metrics, **state},
                                       ckpt_store.checkpoint_name(step, fresh), p.checkpoint_upload)
            debug.record_weights(engine, "save", step)
            if restored is None and debug.get("kill_rank") == rank and debug.get("kill_after_step") == step:
                os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-epoch, after a checkpoint
            if step in debug.get("hold_after_steps", ()):
                time.sleep(debug.get("hold_s", 60))  # a window for a test to take a node away after a checkpoint

    ckpt.export_consolidated(engine, mcfg, spec["out_url"], rank, extra={"steps": state["step"],
                             "objective": p.objective}, vit=vit, prefix="vit." if mpp else "")
    if tracker:
        tracker.metrics({"skipped_nonfinite": state["skipped_nonfinite"], "rollbacks": state["rollbacks"],
                         **{f"stream/{k}": v for k, v in stream.stats.items() if isinstance(v, (int, float))}},
                        step=state["step"])


def _resume_dir(stack: contextlib.ExitStack, restored: Any, world: int, rank: int, ds_cfg: dict) -> str:
    """Local folder of the newest complete checkpoint (the one Ray restored, or an older one if that is incomplete),
    re-cut to the universal format when it was saved at another world size (which sets ``ds_cfg``)."""
    _, d = stack.enter_context(ckpt_store.newest_verified(ckpt_store.committed() or [restored], "resume"))
    meta = ckpt.read_meta(d)
    if meta["world_size"] != world:
        # Elastic resume: the ZeRO shards were cut for another world size; re-cut them via the universal format.
        log.info("rank %d: checkpoint from %d ranks, resuming on %d via a universal checkpoint", rank,
                 meta["world_size"], world)
        out = tempfile.mkdtemp(prefix="vitpipe-universal-")
        stack.callback(shutil.rmtree, out, ignore_errors=True)
        d = ckpt.to_universal(d, meta["tag"], out)
        ds_cfg["checkpoint"] = {"load_universal": True}
    return d


def _count_nonfinite(state: dict, p: PretrainConfig, rank: int, micro: int) -> None:
    state["skipped_nonfinite"] += 1
    n = state["skipped_nonfinite"]
    if rank == 0:
        log.warning("non-finite loss (on at least one rank) at step %d, micro-batch %d: batch skipped (%d of "
                    "pretrain.max_nonfinite=%d)", state["step"] + 1, micro, n, p.max_nonfinite)
    if n > p.max_nonfinite:
        raise FloatingPointError(
            f"pretrain: {n} non-finite losses, more than pretrain.max_nonfinite={p.max_nonfinite} (the last at step "
            f"{state['step'] + 1}, after {state['rollbacks']} rollback(s) to the last checkpoint): the run diverges "
            f"or its data is broken; lower pretrain.lr, lengthen warmup_steps, or check the shards")


def _null_pass(engine: Any, x: torch.Tensor, mpp: bool, device: torch.device) -> None:
    """Forward + backward of a zero loss on an all-zero batch: no gradient, but DeepSpeed's micro-step count and
    ZeRO's gradient hooks advance as for a real micro-batch, so the accumulation window closes at its boundary."""
    z = torch.zeros_like(x)
    out = engine(z, torch.Generator(device=device).manual_seed(0))[0] if mpp else engine(z)
    engine.backward(out.float().sum() * 0.0)
    engine.step()


def _batch_iter(stream: ShardStream):
    """Endless (images, labels, keys) over successive epochs, continuing from wherever the stream's state says."""
    while True:
        empty = True
        for batch in stream.iter_batches(with_keys=True):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the shard stream produced no batch in a whole epoch (too few samples for "
                               "world size x micro_batch?)")


def _tracker(spec: dict) -> Any:
    if not spec.get("mlflow_run_id"):
        return None
    from vitpipe.jobs.tracking import MlflowTracker

    return MlflowTracker.attach(spec["tracking_uri"], spec["mlflow_run_id"])

