"""``pretrain.compile``: the compiled production step trains as the eager one (first steps' losses), on CPU."""

from __future__ import annotations


import pytest
import torch
import torch._dynamo

from vitpipe.jobs.train.callbacks import TrainerCallback
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.spec import PretrainSpec
from vitpipe.jobs.train.synthetic import SyntheticStream
from vitpipe.jobs.train.trainer import Trainer
from vitpipe.models import ViTConfig

# inductor compiles C++ kernels: about a minute on 2 cores; the session's one-rank gloo group (conftest)
pytestmark = [pytest.mark.usefixtures("process_group"), pytest.mark.slow]

MODEL = ViTConfig(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=8, img_size=16, num_classes=5)
STEPS = 8
# Inductor fuses and reorders float32 arithmetic: here the eight losses agree to 1.2e-7 (AMD EPYC, torch 2.13); a real
# divergence (a parameter not trained, a wrong graph) moves them by 1e-3 or more within these steps.
TOLERANCE = 1e-4




class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_log(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self.values.append(metrics["train/loss"])


def losses(compile_mode: str, zero: int) -> list[float]:
    p = PretrainConfig(steps=STEPS, global_batch=8, micro_batch=4, zero_stage=zero, warmup_steps=1, lr=3e-3,
                       log_every=1, checkpoint_every=1000, num_workers=1, compile=compile_mode)
    cb = Losses()
    t = Trainer(PretrainSpec(model=MODEL, pretrain=p, manifest_url="", out_url=""), rank=0, world=1,
                device=torch.device("cpu"), callbacks=[cb], stream=SyntheticStream(batch=4, img_size=16,
                                                                                   num_classes=5))
    try:
        t.train()
        if compile_mode != "none":
            assert t.engine.is_compiled and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    finally:
        t.close()
    return cb.values


def test_inductor_step_matches_eager():
    eager, compiled = losses("none", 1), losses("inductor", 1)
    assert len(eager) == STEPS and len(set(eager[3:])) == STEPS - 3  # it trained (the warmup starts at lr 0)
    assert compiled == pytest.approx(eager, abs=TOLERANCE)
