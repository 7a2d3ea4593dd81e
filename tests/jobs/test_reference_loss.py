"""The production pretraining loop (``Trainer`` on real CIFAR-10 shards through the ShardStream, DeepSpeed, one
process) reproduces the per-step losses recorded in ``tests/assets/losses/tiny_cpu.json`` (torchtitan keeps one such
file per model): any change meant to make the step faster must leave them within tolerance.

Regenerate after a change that is meant to change training (and say why in the commit):
``VITPIPE_WRITE_REFERENCE_LOSSES=1 python -m pytest tests/jobs/test_reference_loss.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path

import pytest
import torch

from vitpipe.jobs.config import resolve_paths
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.configtools import apply_overrides
from vitpipe.jobs.run.runner import run_pipeline
from vitpipe.jobs.stages import stages_for
from vitpipe.jobs.core.tracking import NullTracker
from vitpipe.jobs.train.callbacks import TrainerCallback
from vitpipe.jobs.train.spec import PretrainSpec
from vitpipe.jobs.train.trainer import Trainer

REFERENCE = Path(__file__).resolve().parents[1] / "assets" / "losses" / "tiny_cpu.json"
# The run: the tiny recipe's model and pretraining (ZeRO-2, fp32, AdamW, clipping, warmup + linear decay, global
# batch 32 from two micro-batches of 16) on one rank, 12 steps, a loss logged every step.
# The input pipeline is pinned (no crop, (u - 0.5) / 0.5: the recipes' setting when the file was written) so a
# recipe's choice of crop or normalisation does not move the reference; that code is tested in tests/pipeline.
OVERRIDES = ["pretrain.steps=12", "pretrain.log_every=1", "pretrain.num_workers=1", "pretrain.checkpoint_every=1000",
             "pretrain.stream.rrc_scale=[1.0,1.0]", "pretrain.stream.crop=rrc", "pretrain.stream.mean=[0.5,0.5,0.5]",
             "pretrain.stream.std=[0.5,0.5,0.5]"]
# Float32 on CPU. Measured when the file was written (AMD EPYC): the same machine reproduces the losses exactly;
# ZeRO-0/1/3 instead of 2, or one micro-batch of 32 instead of two of 16, stay within 5e-7; the learning rate 1% off
# moves them by 6e-4, no gradient clipping by 2e-3. Other CPUs may shift them a little (GEMM blocking): the
# tolerance leaves room for that and still catches the changes above (not weight decay: 8e-6 in 12 steps).
TOLERANCE = 2e-4

pytestmark = pytest.mark.usefixtures("process_group")  # the session's one-rank gloo group (conftest)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, cifar10_root) -> str:
    store = tmp_path_factory.mktemp("reference-loss") / "store"
    cfg = resolve_paths(apply_overrides(get_recipe("tiny"), [
        f"store={store}", f"data.root={cifar10_root}", "stages=ingest", "tracking.enabled=false",
        "ingest.num_workers=0"]))
    return run_pipeline(cfg, stages_for(cfg), parent_tracker=NullTracker(), progress=False).results[
        "ingest"].path("manifest")




class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.values.append(metrics["train/loss"])


def run_losses(manifest: str, **pretrain_changes) -> list[float]:
    cfg = apply_overrides(get_recipe("tiny"), OVERRIDES)
    p = dataclasses.replace(cfg.pretrain, **pretrain_changes)
    torch.set_num_threads(1)
    cb = Losses()
    t = Trainer(PretrainSpec(model=cfg.model, pretrain=p, manifest_url=manifest, out_url=""), rank=0, world=1,
                device=torch.device("cpu"), callbacks=[cb])
    try:
        t.train()
    finally:
        t.close()
    return cb.values


def test_losses_match_the_reference_file(shards):
    got = run_losses(shards)
    if os.environ.get("VITPIPE_WRITE_REFERENCE_LOSSES"):
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps({
            "what": "per-step train/loss of the production pretrain loop: tiny recipe, one rank, CPU, fp32",
            "recipe": "tiny", "overrides": OVERRIDES, "tolerance": TOLERANCE, "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "losses": got}, indent=1) + "\n")
    ref = json.loads(REFERENCE.read_text())
    assert ref["overrides"] == OVERRIDES
    assert len(got) == len(ref["losses"]) == 12
    assert got == pytest.approx(ref["losses"], abs=TOLERANCE)
