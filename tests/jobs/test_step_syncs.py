"""The production training step (``Trainer.step``, one process, gloo) reads the device at most once outside log steps,
and its non-finite guard skips a bad step's whole update before it touches the weights, on every ZeRO stage."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vitpipe.jobs.train import checkpoint as ckpt
from vitpipe.jobs.train.checkpointer import LocalCheckpointer
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.hooks import TrainerHooks
from vitpipe.jobs.train.spec import PretrainSpec
from vitpipe.jobs.train.synthetic import SyntheticStream
from vitpipe.jobs.train.syncs import HostSyncCounter
from vitpipe.jobs.train.trainer import Trainer
from vitpipe.models import ViTConfig
from vitpipe.pipeline.mix import MixConfig

MODEL = ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, img_size=16, num_classes=5)

pytestmark = pytest.mark.usefixtures("process_group")  # the session's one-rank gloo group (conftest)




class NanAt(TrainerHooks):
    """The loss of micro-batch ``micro`` of step ``step`` (1-based) is NaN, ``times`` times."""

    def __init__(self, step: int, micro: int, times: int = 1):
        self.at, self.left = (step, micro), times

    def on_loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        if (step, micro) == self.at and self.left:
            self.left -= 1
            return loss * float("nan")
        return loss


def trainer(zero: int, *, accum: int = 1, hooks: TrainerHooks | None = None, checkpointer=None, **kw) -> Trainer:
    p = PretrainConfig(steps=100, global_batch=4 * accum, micro_batch=4, zero_stage=zero, warmup_steps=1,
                       lr=1e-2, log_every=3, checkpoint_every=2, num_workers=1, **kw)
    spec = PretrainSpec(model=MODEL, pretrain=p, manifest_url="", out_url="")
    return Trainer(spec, rank=0, world=1, device=torch.device("cpu"), hooks=hooks, checkpointer=checkpointer,
                   stream=SyntheticStream(batch=4, img_size=16, num_classes=5))


def weights(t: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ckpt.full_fp32_state_dict(t.engine).items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


BF16 = {"precision": "bf16"}  # what a CUDA run gets: DeepSpeed's bf16 optimizers (slow matmuls on CPU, tiny model)


@pytest.mark.parametrize("zero,kw", [
    (0, {}), (1, {}), (2, {}), (3, {}), (1, {"objective": "mpp"}), (1, {"loss": "sigmoid"}),
    (1, {"mix": MixConfig(mixup_alpha=0.8, label_smoothing=0.1)}), (1, BF16), (2, BF16), (3, BF16)],
    ids=["zero0", "zero1", "zero2", "zero3", "zero1-mpp", "zero1-sigmoid", "zero1-mixup", "zero1-bf16",
         "zero2-bf16", "zero3-bf16"])
def test_a_step_reads_the_device_at_most_once(zero, kw):
    """Outside log steps one host read per optimizer step (DeepSpeed's finiteness check of the gradient norm, the
    non-finite guard), in bf16 as in fp32; a log step adds the one read-back of the window and the memory
    gather."""
    t = trainer(zero, accum=2, **kw)
    try:
        for _ in range(2):  # ZeRO-3 checks its parameter trace across ranks during the first steps
            assert t.step()
            t._after_step()
        with HostSyncCounter() as c:
            assert t.step()  # step 3 of 100: no log, no checkpoint after it
        assert c.count <= 1, c.where
        with HostSyncCounter() as c:
            t._after_step()  # step 3: a log step (log_every=3)
        assert t.state.step == 3 and c.count <= 2, c.where
        assert set(t.last_metrics) >= {"train/loss", "train/acc", "train/grad_norm", "train/lr"}
    finally:
        t.close()


@pytest.mark.parametrize("zero,kw", [(0, {}), (1, {}), (2, {}), (3, {}), (1, BF16), (2, BF16), (3, BF16)],
                         ids=["zero0", "zero1", "zero2", "zero3", "zero1-bf16", "zero2-bf16", "zero3-bf16"])
def test_nan_in_the_first_of_two_micro_batches_skips_the_whole_update(zero, kw):
    """No checkpoint yet: the NaN in micro-batch 0 reaches neither the weights nor the optimizer state; the step
    does not count (and DeepSpeed's step count agrees); the next step trains normally. In bf16 the skip comes from
    the norm check alone (``engine.overflow_by_norm``)."""
    t = trainer(zero, accum=2, hooks=NanAt(step=3, micro=0), **kw)
    try:
        assert t.step() and t.step()  # two steps first: past the warmup's zero learning rate
        before, opt_steps = weights(t), t.engine.global_steps
        assert t.step() is False
        assert same(weights(t), before)
        assert (t.state.step, t.state.skipped_nonfinite, t.state.rollbacks) == (2, 1, 0)
        assert t.engine.global_steps == opt_steps == 2
        assert t.step() is True  # step 3 again, on the next batches
        assert not same(weights(t), before) and t.engine.global_steps == 3
    finally:
        t.close()


def test_nan_rolls_back_to_the_newest_checkpoint_and_fails_past_max_nonfinite(tmp_path):
    """With checkpoints (every 2 steps, in a local folder): a NaN in the second micro-batch of step 3 rolls back to
    step 2's exact weights; the same NaN again is one more than max_nonfinite=1 and fails the run saying so."""
    t = trainer(1, accum=2, hooks=NanAt(step=3, micro=1, times=2), checkpointer=LocalCheckpointer(str(tmp_path)),
                max_nonfinite=1)
    try:
        for _ in range(2):
            assert t.step()
            t._after_step()
        at2 = weights(t)
        assert t.step() is False
        assert (t.state.step, t.state.rollbacks, t.engine.global_steps) == (2, 1, 2)
        assert same(weights(t), at2)
        with pytest.raises(FloatingPointError, match=r"2 non-finite losses, more than pretrain.max_nonfinite=1 .*"
                                                     r"after 1 rollback\(s\)"):
            t.step()
    finally:
        t.close()


def test_metrics_window_matches_the_losses_of_its_steps():
    """The device-side window's mean loss is the mean of the steps' losses computed independently (the same
    batches through a copy of the model, before each update)."""
    t = trainer(1, accum=1)
    try:
        t.p = dataclasses.replace(t.p, log_every=2)
        losses = []
        for _ in range(2):
            x, y, _ = t.stream._make(t.stream.index)
            with torch.no_grad():
                logits = t.vit(x)
            losses.append(torch.nn.functional.cross_entropy(logits, y).item())
            assert t.step()
        t._after_step()
        assert t.last_metrics["train/loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    finally:
        t.close()
