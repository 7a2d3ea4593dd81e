"""The pretraining loop run by every Ray Train worker, as an object that owns its state (torchtitan ``Trainer``):
a DeepSpeed engine over the ViT, this rank's share of the shard stream, the step counters, and rank 0's tracker.

    trainer = Trainer(spec, rank=r, world=w, device=d, checkpointer=RayTrainCheckpointer(restored, upload))
    try:
        trainer.train()        # step() until pretrain.steps, logging and checkpointing on the way
        trainer.export()       # consolidated model.pt + model.json (collective)
    finally:
        trainer.close()        # the stream's loader workers and the tracker

``state_dict()`` is what a checkpoint carries besides DeepSpeed's own state (step counters, stream position, RNG);
``load_state_dict`` restores it. Where checkpoints go is the ``checkpointer`` (``jobs/train/checkpointer.py``: Ray
Train's store in a worker; a local folder or none in tests and benchmarks, which run this same loop in one process).
What runs alongside training (in-training evaluation, progress for the driver) comes in as ``callbacks``; test hooks
(fault injection, audit records) through ``hooks``.

A step never waits for the device: losses and accuracies are summed on it and read back once per ``log_every``
window (``metrics.log_window``); the only host read of a step is DeepSpeed's check that the gradient norm is finite
(the non-finite guard, below).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.callbacks import TrainerCallback
from vitpipe.jobs.train.checkpointer import Checkpointer, NoCheckpointer
from vitpipe.jobs.train.dist import gather_floats
from vitpipe.jobs.train.ds_config import accumulation_steps, scaled_lr
from vitpipe.jobs.train.engine import attention_backend, build_engine, compile_engine
from vitpipe.jobs.train.evaluation import InTrainingEval
from vitpipe.jobs.train.hooks import TrainerHooks
from vitpipe.jobs.train.metrics import MetricWindow, log_window, memory_metrics
from vitpipe.jobs.train.optim import classification_loss, top1_tensor
from vitpipe.jobs.train.spec import PretrainSpec
from vitpipe.models import create, flops
from vitpipe.models.mpp import MaskedPatchPrediction
from vitpipe.pipeline import ShardStream

log = logging.getLogger("vitpipe.pretrain")


@dataclass
class TrainState:
    """The trainer's counters (checkpointed; a rollback restores ``step`` only, the others keep counting)."""

    step: int = 0
    skipped_nonfinite: int = 0
    rollbacks: int = 0


class Trainer:
    """One rank of a pretraining run. ``checkpointer``: where checkpoints are saved, resumed and rolled back from
    (default: nowhere). ``stream``: the batches (default: this rank's :class:`ShardStream` of the spec's manifest;
    anything with ShardStream's ``iter_batches(with_keys=True)``, ``state_dict``/``load_state_dict``,
    ``batches_per_epoch``, ``stats`` and ``close``). ``ds_settings``: the device type whose DeepSpeed settings the
    engine gets (default: ``device``'s; a benchmark measures CUDA's on CPU)."""

    def __init__(self, spec: PretrainSpec, *, rank: int, world: int, device: torch.device,
                 checkpointer: Checkpointer | None = None, hooks: TrainerHooks | None = None,
                 callbacks: list[TrainerCallback] | None = None, stream: Any = None, ds_settings: str | None = None):
        p = self.p = spec.pretrain
        self.spec, self.rank, self.world, self.device = spec, rank, world, device
        self.hooks = hooks or TrainerHooks()
        self.callbacks = list(callbacks or [])
        self.checkpointer = checkpointer or NoCheckpointer()
        self.mcfg = spec.model
        torch.manual_seed(p.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
        self.vit = create(self.mcfg)
        if p.activation_checkpointing:
            self.vit.set_grad_checkpointing(True)
        self.mpp = p.objective == "mpp"
        model = MaskedPatchPrediction(self.vit) if self.mpp else self.vit
        self.num_params = sum(t.numel() for t in model.parameters())
        ckpt.allow_deepspeed_globals()
        resume = contextlib.ExitStack()  # a downloaded or converted checkpoint is kept until it is loaded
        resume_dir, universal = self._resume_dir(resume)
        self.engine, self.ds_cfg = build_engine(model, p, world_size=world, device=device,
                                                num_params=self.num_params, universal=universal,
                                                settings_for=ds_settings)
        self.bf16 = self.ds_cfg["bf16"]["enabled"]
        # observed before compiling (the probe is an eager forward): the kernel the model's attention really runs
        self.attention = attention_backend(self.vit, torch.bfloat16 if self.bf16 else torch.float32, device)
        compile_engine(self.engine, p.compile)
        self.accum = accumulation_steps(p.global_batch, p.micro_batch, world)
        # a mix carries its exclusions and subsets per source (PretrainSpec.sources); one manifest in the stream config
        scfg = dataclasses.replace(p.resolved_stream(), batch_size=p.micro_batch, seed=p.seed,
                                   exclude=None if spec.sources else spec.exclude_url or p.stream.exclude)
        # the exported model (and in-training evals) fold this into the patch embedding: consumers feed 0.5/0.5
        self.input_normalisation = (tuple(scfg.mean), tuple(scfg.std))
        self.mix = p.resolved_mix()
        self.soft_targets = self.mix.mixing or self.mix.label_smoothing > 0
        self.stream = stream if stream is not None else ShardStream(list(spec.sources) or spec.manifest_url, scfg,
                                                                    rank=rank, world_size=world)
        self.tracker = spec.tracking.attach() if rank == 0 and spec.tracking else None
        self.state = TrainState()
        # no checkpoint folder of this run can exist at a later step (ckpt_store.checkpoint_name)
        self.fresh_timeline = resume_dir is None
        self.resumed = resume_dir is not None
        if resume_dir is not None:
            self.load_state_dict(ckpt.load(self.engine, resume_dir))
            log.info("rank %d resumed at step %d", rank, self.state.step)
            if rank == 0:
                self.hooks.on_step_keys("resume", self.state.step, [])
        resume.close()
        self.flops = flops(self.mcfg)
        self.window = MetricWindow()
        self.last_metrics: dict[str, float] = {}
        self._batches = self._batch_iter()
        self._step_keys: list[str] = []
        self._log_start()

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The client state of a checkpoint: counters, stream position, CPU RNG."""
        return {"trainer": dataclasses.asdict(self.state), "stream": self.stream.state_dict(),
                "rng_cpu": torch.get_rng_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.state = TrainState(**sd["trainer"])
        self.stream.load_state_dict(sd["stream"])
        torch.set_rng_state(sd["rng_cpu"])

    # ------------------------------------------------------------------------------------------------ loop
    def train(self) -> None:
        """Optimizer steps until ``pretrain.steps``, logging every ``log_every`` and checkpointing every
        ``checkpoint_every`` steps (and at the end)."""
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.state.step < self.p.steps:
            if self.step():
                self._after_step()
        for cb in self.callbacks:
            cb.on_train_end(self)

    def step(self) -> bool:
        """One optimizer step over ``accumulation`` micro-batches. Returns whether the step counter advanced.

        The non-finite guard: DeepSpeed applies the update at the last micro-batch's ``engine.step()`` (the others
        only accumulate gradients), after checking that the global gradient norm, reduced over every rank, is
        finite. A non-finite loss on any rank makes it non-finite, so every rank skips the whole update (no
        micro-batch of the step touches the weights or the optimizer state), and every rank then rolls back to
        the newest complete checkpoint, bounded by ``pretrain.max_nonfinite``."""
        p, engine = self.p, self.engine
        skipped = engine.skipped_steps
        loss_sum = acc_sum = None
        for micro in range(self.accum):
            t_wait = time.perf_counter()
            x, y, keys = next(self._batches)
            self.window.wait += time.perf_counter() - t_wait
            if self.hooks.records_keys:
                self._step_keys.extend(keys)
            loss, acc = self._forward(x, y, micro)
            loss = self.hooks.on_loss(loss, self.state.step + 1, micro)
            engine.backward(loss)
            engine.step()
            # summed on the device: no host read per micro-batch
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            acc_sum = acc if acc_sum is None else acc_sum + acc
        if engine.skipped_steps != skipped:
            return self._skipped_step()
        self.state.step += 1
        self.window.add(loss_sum, acc_sum, self.accum, p.global_batch)
        return True

    def _forward(self, x: torch.Tensor, y: torch.Tensor, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, top-1 accuracy) of one micro-batch, both 0-d device tensors."""
        p = self.p
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.soft_targets:  # on the device, after the stream: sample accounting and resume are untouched
            x, y = self.mix.mix(x, y, num_classes=self.mcfg.num_classes, seed=p.seed, rank=self.rank,
                                step=self.state.step * self.accum + micro)
        if self.bf16:
            x = x.to(torch.bfloat16)
        if self.mpp:  # corruption randomness from (seed, step, rank, micro-batch): identical after a resume
            g = torch.Generator(device=self.device).manual_seed(
                ((p.seed * 1_000_003 + self.state.step) * 1_009 + self.rank) * 101 + micro)
            return self.engine(x, g)
        logits = self.engine(x)
        return classification_loss(logits, y, p.loss), top1_tensor(logits.detach(), y)

    def _skipped_step(self) -> bool:
        """After DeepSpeed skipped an update (a non-finite gradient norm on some rank): count it, roll back."""
        self._step_keys = []
        self._count_nonfinite()
        if self._rollback():
            return False
        # No checkpoint yet: nothing of the step reached the weights, and the LR schedule did not move; DeepSpeed
        # still counted it as a step, which it is not (the engine's step count stays the trainer's).
        self.engine.global_steps -= 1
        self.engine.global_samples -= self.engine.train_batch_size()
        return False

    def _rollback(self) -> bool:
        """Reload the newest complete checkpoint (collective); False when the run has none yet."""
        client = self.checkpointer.rollback(self.engine, before_verify=self.hooks.before_rollback_verify)
        if client is None:
            return False
        # The engine is back at the checkpoint (weights, optimizer, LR schedule, its step count), and so is the
        # trainer's step; the counters keep counting. The data stream and RNG move on: the offending batch and those
        # after the checkpoint are not replayed (as PaLM's restarts skip batches).
        self.state.step = client["trainer"]["step"]
        self.state.rollbacks += 1
        self.fresh_timeline = False
        if self.rank == 0:
            log.warning("rolled back to step %d (rollback %d)", self.state.step, self.state.rollbacks)
        self.hooks.after_rollback(self.engine, self.state.step)
        return True

    def _after_step(self) -> None:
        p, step = self.p, self.state.step
        self.hooks.on_step_keys(self.rank, step, self._step_keys)
        self._step_keys = []
        if step % p.log_every == 0 or step == p.steps:
            mem = memory_metrics(self.device)  # collective: every rank, at the same step
            if self.rank == 0:
                self.last_metrics = log_window(self.tracker, self.engine, self.window, self.flops, p, self.world,
                                               step, self.stream.state_dict()["epoch"], mem)
                for cb in self.callbacks:
                    cb.on_log(self, self.last_metrics)
            else:
                self.window.reset()
        if step % p.checkpoint_every == 0 or step == p.steps:
            self.checkpointer.save(self.engine, step=step, rank=self.rank, world=self.world,
                                   client=self.state_dict(),
                                   metrics={**self.last_metrics, **dataclasses.asdict(self.state)},
                                   fresh_timeline=self.fresh_timeline)
            self.hooks.after_save(self.engine, step, self.resumed)
        for cb in self.callbacks:
            cb.on_step_end(self)

    # ------------------------------------------------------------------------------------------------ end
    def export(self) -> None:
        """Every rank joins in gathering the full fp32 weights; rank 0 writes ``model.pt`` + ``model.json``."""
        ckpt.export_consolidated(self.engine, self.mcfg, self.spec.out_url, self.rank,
                                 extra={"steps": self.state.step, "objective": self.p.objective}, vit=self.vit,
                                 prefix="vit." if self.mpp else "", normalisation=self.input_normalisation)
        # samples per source over all ranks (collective: every rank has every source name, in the same order)
        per_source = {f"train/data/source_samples/{name}": sum(gather_floats(n))
                      for name, n in self.stream.stats.get("source_samples", {}).items()}
        if self.tracker:
            self.tracker.metrics({"train/skipped_nonfinite": self.state.skipped_nonfinite,
                                  "train/rollbacks": self.state.rollbacks, **per_source,
                                  **{f"train/data/{k}": v for k, v in self.stream.stats.items()
                                     if isinstance(v, (int, float))}}, step=self.state.step)

    def close(self) -> None:
        """Stop the stream's loader workers; idempotent."""
        self.stream.close()

    # ------------------------------------------------------------------------------------------------ helpers
    def _log_start(self) -> None:
        if self.rank != 0:
            return
        p = self.p
        info = {"world_size": self.world, "micro_batch": p.micro_batch, "accumulation_steps": self.accum,
                "global_batch": p.global_batch, "scaled_lr": scaled_lr(p),
                "zero_stage": self.ds_cfg["zero_optimization"]["stage"], "precision": "bf16" if self.bf16 else "fp32",
                "compile": p.compile, "attention": self.attention, "num_params": self.num_params,
                "batches_per_epoch": self.stream.batches_per_epoch(), "checkpoint_upload": p.checkpoint_upload}
        log.info("pretrain: %s", ", ".join(f"{k}={v}" for k, v in info.items()))
        if self.device.type == "cuda" and not self.attention.startswith(("flash", "cudnn")):
            log.warning("pretrain: attention runs the %s SDPA kernel on %s, not flash attention (dtype, head size "
                        "or the installed torch rule it out): expect a slower step", self.attention,
                        torch.cuda.get_device_name(self.device))
        if self.tracker:
            self.tracker.params({"resolved": info})

    def _resume_dir(self, stack: contextlib.ExitStack) -> tuple[str | None, bool]:
        """Local folder of the checkpoint to resume from (None: a fresh start), and whether it had to be re-cut to
        the universal format because it was saved at another world size."""
        d = self.checkpointer.resume(stack)
        if d is None:
            return None, False
        meta = ckpt.read_meta(d)
        if meta["world_size"] == self.world:
            return d, False
        # Elastic resume: the ZeRO shards were cut for another world size; re-cut them via the universal format.
        log.info("rank %d: checkpoint from %d ranks, resuming on %d via a universal checkpoint", self.rank,
                 meta["world_size"], self.world)
        out = tempfile.mkdtemp(prefix="vitpipe-universal-")
        stack.callback(shutil.rmtree, out, ignore_errors=True)
        return ckpt.to_universal(d, meta["tag"], out), True

    def _count_nonfinite(self) -> None:
        st, p = self.state, self.p
        st.skipped_nonfinite += 1
        n = st.skipped_nonfinite
        if self.rank == 0:
            log.warning("non-finite loss or gradient (on at least one rank) at step %d: its update skipped (%d of "
                        "pretrain.max_nonfinite=%d)", st.step + 1, n, p.max_nonfinite)
        if n > p.max_nonfinite:
            raise FloatingPointError(
                f"pretrain: {n} non-finite losses, more than pretrain.max_nonfinite={p.max_nonfinite} (the last at "
                f"step {st.step + 1}, after {st.rollbacks} rollback(s) to the last checkpoint): the run diverges or "
                f"its data is broken; lower pretrain.lr, lengthen warmup_steps, or check the shards")

    def _batch_iter(self) -> Iterator[tuple]:
        """Endless (images, labels, keys) over successive epochs, continuing from wherever the stream's state says."""
        while True:
            empty = True
            for batch in self.stream.iter_batches(with_keys=True):
                empty = False
                yield batch
            if empty:
                raise RuntimeError("the shard stream produced no batch in a whole epoch (too few samples for "
                                   "world size x micro_batch?)")


def build_callbacks(spec: PretrainSpec, rank: int) -> list[TrainerCallback]:
    """The callbacks a pretraining run's spec asks for, in the order they run (one line per kind)."""
    callbacks: list[TrainerCallback] = []
    if spec.pretrain.evals.tasks:  # in-training few-shot curves (rank 0 evaluates; all ranks gather under ZeRO-3)
        callbacks.append(InTrainingEval(spec.pretrain.evals, spec.out_url, rank))
    return callbacks


def pretrain_worker(config: dict, callbacks: list[TrainerCallback] | None = None) -> None:
    """Ray Train entry point: ``config`` is a :class:`PretrainSpec` as a dict; ``callbacks`` come on top of those
    the spec asks for (the stage's progress feed)."""
    import warnings

    import ray.train
    import ray.train.torch

    from vitpipe.jobs.train.ckpt_store import RayTrainCheckpointer
    from vitpipe.jobs.train.hooks import load_hooks

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # DeepSpeed's ZeRO step calls all_gather_into_tensor, deprecated since torch 2.13: a FutureWarning per rank and
    # step would bury the progress lines (Ray prints each worker's stderr).
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    spec = PretrainSpec.from_dict(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    p = spec.pretrain
    torch.set_num_threads(p.threads_per_worker or p.cpus_per_worker)
    device = ray.train.torch.get_device() if p.use_gpu else torch.device("cpu")
    callbacks = build_callbacks(spec, rank) + list(callbacks or [])
    for cb in callbacks:
        cb.on_setup(rank, "entered")
    trainer = Trainer(spec, rank=rank, world=world, device=device,
                      checkpointer=RayTrainCheckpointer(ray.train.get_checkpoint(), p.checkpoint_upload),
                      hooks=load_hooks(rank, spec.out_url), callbacks=callbacks)
    for cb in callbacks:
        cb.on_setup(rank, "ready")
    # MLflow's own CPU / memory / GPU sampling on rank 0's node, into the stage's run
    sampler = trainer.tracker.system_metrics() if trainer.tracker else contextlib.nullcontext()
    try:
        with sampler:
            trainer.train()
            trainer.export()
    finally:
        trainer.close()
