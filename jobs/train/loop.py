"""The pretraining loop run by every Ray Train worker: DeepSpeed engine + the rank's share of the shard stream."""

from __future__ import annotations

import logging
import math
import os
import signal
import tempfile
import time
from typing import Any

import torch

from vitpipe.jobs.configtools import from_dict
from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.ds_config import accumulation_steps, deepspeed_config, scaled_lr
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
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p: PretrainConfig = from_dict(PretrainConfig, spec["pretrain"])
    mcfg = ViTConfig.from_dict(spec["model"])
    torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")

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
    resume_dir = None
    if restored is not None:
        resume_dir = restored.to_directory()  # a local copy (a no-op path for local storage)
        meta = ckpt.read_meta(resume_dir)
        if meta["world_size"] != world:
            # Elastic resume: the ZeRO shards were cut for another world size; re-cut them via the universal format.
            log.info("rank %d: checkpoint from %d ranks, resuming on %d via a universal checkpoint", rank,
                     meta["world_size"], world)
            resume_dir = ckpt.to_universal(resume_dir, meta["tag"], tempfile.mkdtemp(prefix="vitpipe-universal-"))
            ds_cfg["checkpoint"] = {"load_universal": True}
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
        if (spec.get("debug") or {}).get("record_keys") and rank == 0:
            _record_keys(spec["out_url"], "resume", state["step"], [])

    fl = flops(mcfg)
    if rank == 0:
        info = {"world_size": world, "micro_batch": p.micro_batch, "accumulation_steps": accum,
                "global_batch": p.global_batch, "scaled_lr": scaled_lr(p), "zero_stage":
                ds_cfg["zero_optimization"]["stage"], "precision": "bf16" if bf16 else "fp32",
                "num_params": num_params, "batches_per_epoch": stream.batches_per_epoch()}
        log.info("pretrain: %s", ", ".join(f"{k}={v}" for k, v in info.items()))
        if tracker:
            tracker.params({"resolved": info})

    batches = _batch_iter(stream)
    window = {"t0": time.perf_counter(), "wait": 0.0, "images": 0, "loss": 0.0, "acc": 0.0, "n": 0}
    last_ckpt_dir: str | None = None
    last_metrics: dict[str, float] = {}
    debug = spec.get("debug") or {}  # test hooks: fault injection, sample-key recording
    step_keys: list[str] = []
    while state["step"] < p.steps:
        losses = []
        for _ in range(accum):
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
                    ((p.seed * 1_000_003 + state["step"]) * 1_009 + rank) * 101 + len(losses))
                loss, acc = engine(x, g)
            else:
                logits = engine(x)
                loss = classification_loss(logits, y, p.loss)
            if not _all_finite(loss):
                # Skip the batch before it touches the weights; repeated failures roll back (paper-scale runs
                # hit the odd bad batch / loss spike and must not die or silently diverge).
                state["skipped_nonfinite"] += 1
                if state["skipped_nonfinite"] > p.max_nonfinite:
                    raise FloatingPointError(f"{state['skipped_nonfinite']} non-finite losses; last at step "
                                             f"{state['step']} (pretrain.max_nonfinite={p.max_nonfinite})")
                if last_ckpt_dir:
                    ckpt.load(engine, last_ckpt_dir)
                    state["rollbacks"] += 1
                engine.zero_grad()
                losses = None
                break
            engine.backward(loss)
            engine.step()
            losses.append(loss.item())
            window["acc"] += acc.item() if mpp else top1(logits.detach(), y)
            window["n"] += 1
        if losses is None:
            continue
        state["step"] += 1
        if debug.get("record_keys"):
            _record_keys(spec["out_url"], rank, state["step"], step_keys)
        step_keys = []
        window["images"] += p.global_batch
        window["loss"] += sum(losses) / len(losses)
        step = state["step"]
        if rank == 0 and (step % p.log_every == 0 or step == p.steps):
            last_metrics = _log_window(tracker, engine, window, fl, p, world, step, stream)
        if step % p.checkpoint_every == 0 or step == p.steps:
            last_ckpt_dir = _save_and_report(engine, stream, state, step, rank, world, last_metrics)
            if restored is None and debug.get("kill_rank") == rank and debug.get("kill_after_step") == step:
                os.kill(os.getpid(), signal.SIGKILL)  # a worker dying mid-epoch, after a checkpoint

    ckpt.export_consolidated(engine, mcfg, spec["out_url"], rank, extra={"steps": state["step"],
                             "objective": p.objective}, vit=vit, prefix="vit." if mpp else "")
    if tracker:
        tracker.metrics({"skipped_nonfinite": state["skipped_nonfinite"], "rollbacks": state["rollbacks"],
                         **{f"stream/{k}": v for k, v in stream.stats.items() if isinstance(v, (int, float))}},
                        step=state["step"])


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


def _record_keys(out_url: str, rank: int | str, step: int, keys: list[str]) -> None:
    import json

    import fsspec

    with fsspec.open(f"{out_url}/debug/keys-rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"step": step, "keys": keys}) + "\n")


def _all_finite(loss: torch.Tensor) -> bool:
    """True on every rank iff the loss is finite on every rank (so all ranks skip together, never deadlock)."""
    flag = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0])
    if torch.distributed.is_initialized():
        if loss.is_cuda:
            flag = flag.cuda()
        torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


def _save_and_report(engine, stream: ShardStream, state: dict, step: int, rank: int, world: int,
                     metrics: dict) -> str:
    import ray.train

    d = tempfile.mkdtemp(prefix=f"vitpipe-ckpt-r{rank}-")
    ckpt.save(engine, d, step, client={"trainer": dict(state), "stream": stream.state_dict(),
                                       "rng_cpu": torch.get_rng_state()})
    if rank == 0:
        ckpt.write_meta(d, {"world_size": world, "tag": f"step{step}", "step": step})
    ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(d),
                     checkpoint_dir_name=f"step_{step:08d}")
    return d


def _log_window(tracker, engine, w: dict, fl: dict, p: PretrainConfig, world: int, step: int,
                stream: ShardStream) -> dict[str, float]:
    dt = max(time.perf_counter() - w["t0"], 1e-9)
    n_steps = max(1, w["images"] // p.global_batch)
    ips = w["images"] / dt
    gn = engine.get_global_grad_norm()
    m = {"loss": w["loss"] / n_steps, "train_acc": w["acc"] / max(1, w["n"]), "lr": engine.get_lr()[0],
         "images_per_s": ips, "tflops": ips * fl["train_flops"] / 1e12,
         "data_wait_frac": w["wait"] / dt, "epoch": stream.state_dict()["epoch"]}
    if gn is not None and math.isfinite(float(gn)):
        m["grad_norm"] = float(gn)
    if p.peak_tflops:
        m["mfu"] = m["tflops"] / (p.peak_tflops * world)
    if torch.cuda.is_available():
        m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource
        m["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if tracker:
        tracker.metrics(m, step=step)
    eta = (p.steps - step) * p.global_batch / max(ips, 1e-9)
    log.info("pretrain step %d/%d (%.0f%%) loss %.4f lr %.2e %.1f img/s data-wait %.0f%% eta %.0fs", step, p.steps,
             100 * step / p.steps, m["loss"], m["lr"], ips, 100 * m["data_wait_frac"], eta)
    w.update(t0=time.perf_counter(), wait=0.0, images=0, loss=0.0, acc=0.0, n=0)
    return m


def _tracker(spec: dict) -> Any:
    if not spec.get("mlflow_run_id"):
        return None
    from vitpipe.jobs.tracking import MlflowTracker

    return MlflowTracker.attach(spec["tracking_uri"], spec["mlflow_run_id"])

