"""In-training evaluation (jobs/train/evaluation.py) on a toy trainer: a real ViT, a real MLflow store (sqlite), no
Ray or DeepSpeed (the trainer's seam is the four callback methods). The curves' values equal the few-shot evaluator
run independently on the same weights; evaluation leaves the training RNG and weights alone; a resumed attempt, in
the same MLflow run or in a new one, continues the curves with no step twice."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from vitpipe.jobs.evals.features import make_embed_fn
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval
from vitpipe.jobs.evals.taskspec import make_task
from vitpipe.jobs.core.tracking import MlflowTracker
from vitpipe.jobs.train.trainer import build_callbacks
from vitpipe.jobs.train.config import PretrainConfig, TrainEvalConfig
from vitpipe.jobs.train.evaluation import (EVALS_FILE, SECONDS, InTrainingEval, check_evals, curves, prepare_evals,
                                           read_evals)
from vitpipe.models import ViTConfig, create
from vitpipe.models.mpp import MaskedPatchPrediction

MCFG = ViTConfig.from_name("mu/4", img_size=32, num_classes=10)
CFG = TrainEvalConfig(tasks=("digits",), every=2, shots=(1, 5), seeds=(0, 1), test_limit=60, max_stall=None)
NAME = "eval/digits.val/5shot"


class ToyEngine:
    """What the callback reads of a DeepSpeed engine: its ZeRO stage and (ZeRO-3) its module."""

    def __init__(self, module: torch.nn.Module, stage: int = 0):
        self.module, self.stage = module, stage

    def zero_optimization_stage(self) -> int:
        return self.stage


def toy_trainer(step: int = 0, tracker=None, stage: int = 0, mpp: bool = False, steps: int = 4):
    torch.manual_seed(0)
    vit = create(MCFG)
    module = MaskedPatchPrediction(vit) if mpp else vit
    return types.SimpleNamespace(rank=0, state=types.SimpleNamespace(step=step), p=types.SimpleNamespace(steps=steps),
                                 engine=ToyEngine(module, stage), vit=vit, mcfg=MCFG, device=torch.device("cpu"),
                                 tracker=tracker, mpp=mpp)


def train(trainer, cb, until: int) -> None:
    """The trainer's calls, with a weight change per step standing in for the optimizer."""
    cb.on_train_start(trainer)
    while trainer.state.step < until:
        with torch.no_grad():
            for p in trainer.vit.parameters():
                p.mul_(0.9).add_(0.01)
        trainer.state.step += 1
        cb.on_step_end(trainer)
    cb.on_train_end(trainer)


def reference(vit: torch.nn.Module) -> dict[str, float]:
    """The few-shot evaluator on the same weights through the stage's own embedding path (no image bank)."""
    task = make_task("digits").validation()
    probe = FewshotConfig(shots=CFG.shots, seeds=CFG.seeds, test_limit=CFG.test_limit)
    return fewshot_eval(make_embed_fn(vit, task, img_size=32), task, probe)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"  # one store: creating one costs seconds


def _history(tracker, name):
    return [(m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, name)]


def test_curves_match_the_evaluator_and_a_resume_continues_them(tmp_path, mlflow_uri):
    run = MlflowTracker.start(mlflow_uri, "in-training-eval", "pretrain")
    tr = toy_trainer(tracker=run)
    cb = InTrainingEval(CFG, str(tmp_path), rank=0)
    rng, weights = None, None

    cb.on_train_start(tr)  # step 0: the random-init point
    ref0 = reference(tr.vit)
    rng = torch.get_rng_state()
    weights = {k: v.clone() for k, v in tr.vit.state_dict().items()}
    tr.state.step = 2
    cb.on_step_end(tr)
    assert torch.equal(torch.get_rng_state(), rng)  # training's generator untouched (model init drew inside a fork)
    assert all(torch.equal(weights[k], v) for k, v in tr.vit.state_dict().items())
    rec = read_evals(str(tmp_path))
    assert [p["step"] for p in rec["points"]] == [0, 2]
    assert rec["points"][0]["metrics"] == pytest.approx(ref0, abs=1e-9)  # exact up to float printing
    assert _history(run, NAME) == [(0, ref0["digits.val/5shot/mean"]), (2, ref0["digits.val/5shot/mean"])]
    std = dict(_history(run, NAME + "_std"))
    assert std[0] == pytest.approx(np.std([ref0["digits.val/5shot/seed0"], ref0["digits.val/5shot/seed1"]], ddof=1))

    # the run goes on to step 4 with changed weights; the values follow the weights
    train(tr, cb, until=4)  # on_train_start again re-reads the record: steps 0 and 2 are not evaluated twice
    ref4 = reference(tr.vit)
    assert [s for s, _ in _history(run, NAME)] == [0, 2, 4]
    assert dict(_history(run, NAME))[4] == pytest.approx(ref4["digits.val/5shot/mean"], abs=1e-12)

    # Ray Train restarts the group from the checkpoint of step 2, in the same MLflow run: steps 3.. are re-run,
    # 4 is recorded already, 6 is new; nothing twice.
    tr2 = toy_trainer(step=2, tracker=MlflowTracker.attach(mlflow_uri, run.run_id), steps=6)
    train(tr2, InTrainingEval(CFG, str(tmp_path), rank=0), until=6)
    assert [s for s, _ in _history(run, NAME)] == [0, 2, 4, 6]
    assert [s for s, _ in _history(run, SECONDS)] == [0, 2, 4, 6]
    assert [p["step"] for p in read_evals(str(tmp_path))["points"]] == [0, 2, 4, 6]

    # `vitpipe resume`: a new child run for the stage gets the earlier points from evals.json, then goes on
    new = MlflowTracker.start(mlflow_uri, "in-training-eval", "pretrain (resume)")
    tr3 = toy_trainer(step=6, tracker=new, steps=8)
    train(tr3, InTrainingEval(CFG, str(tmp_path), rank=0), until=8)
    assert [s for s, _ in _history(new, NAME)] == [0, 2, 4, 6, 8]
    assert dict(_history(new, NAME))[2] == dict(_history(run, NAME))[2]
    by_k = curves(read_evals(str(tmp_path)))["digits.val"]
    assert [s for s, _, _ in by_k[5]] == [0, 2, 4, 6, 8] and set(by_k) == {1, 5}
    assert (tmp_path / "figures" / "fewshot_vs_step.png").stat().st_size > 10_000


def test_zero3_snapshot_and_mpp_prefix(tmp_path):
    """ZeRO-3 goes through ``full_fp32_state_dict`` (every rank; here one, no process group), MPP's encoder keys
    lose their ``vit.`` prefix; the values are those of the plain path."""
    plain = InTrainingEval(CFG, str(tmp_path / "a"), rank=0)
    train(toy_trainer(), plain, until=2)
    z3 = InTrainingEval(CFG, str(tmp_path / "b"), rank=0)
    train(toy_trainer(stage=3, mpp=True), z3, until=2)
    assert z3.gather
    a, b = read_evals(str(tmp_path / "a"))["points"], read_evals(str(tmp_path / "b"))["points"]
    assert [p["metrics"] for p in a] == [p["metrics"] for p in b]


def test_max_stall_postpones_grid_points_but_never_the_last(tmp_path):
    cfg = TrainEvalConfig(tasks=("digits",), every=1, shots=(1,), seeds=(0,), test_limit=20, max_stall=1e-9,
                          at_start=False)
    cb = InTrainingEval(cfg, str(tmp_path), rank=0)
    train(toy_trainer(steps=3), cb, until=3)
    # step 1 is the first (no cost known yet), step 2 would exceed any budget, step 3 is the last
    assert [p["step"] for p in read_evals(str(tmp_path))["points"]] == [1, 3]
    assert cb.postponed == 1


def test_test_split_names_and_no_callback_without_tasks(tmp_path):
    cfg = TrainEvalConfig(tasks=("digits@48",), every=2, shots=(1,), seeds=(0,), test_limit=30, split="test")
    cb = InTrainingEval(cfg, str(tmp_path), rank=0)
    train(toy_trainer(steps=2), cb, until=2)
    rec = read_evals(str(tmp_path))
    assert rec["settings"]["sizes"] == {"digits_48px": 48} and rec["settings"]["split"] == "test"
    assert set(rec["points"][0]["metrics"]) == {"digits_48px/1shot/seed0", "digits_48px/1shot/mean",
                                                "digits_48px/1shot/std"}
    assert json.loads((tmp_path / EVALS_FILE).read_text())["settings"]["split_info"]["digits_48px"]["kind"] == "fixed"
    spec = types.SimpleNamespace(pretrain=PretrainConfig(), out_url=str(tmp_path))
    assert build_callbacks(spec, 0) == []
    spec.pretrain = PretrainConfig(evals=CFG)
    assert [type(c).__name__ for c in build_callbacks(spec, 0)] == ["InTrainingEval"]


def test_settings_checked_in_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^pretrain.evals.transfer_tasks names 'x', not a label"):
        check_evals(TrainEvalConfig(tasks=("digits",), transfer_tasks=("x",)))
    with pytest.raises(ValueError, match="needs pretrain.evals.split=validation and shots including 10 and 25"):
        check_evals(TrainEvalConfig(tasks=("digits",), shots=(1, 5), transfer_tasks=("digits",)))
    with pytest.raises(ValueError, match="label 'digits' twice"):
        check_evals(TrainEvalConfig(tasks=("digits", "digits")))
    with pytest.raises(ValueError, match=r"^pretrain.evals.every must be >= 1, got 0$"):
        TrainEvalConfig(every=0)
    cfg = prepare_evals(TrainEvalConfig(tasks=("h=data/h", "digits", "s3=s3://b/x")), base="/base")
    assert cfg.tasks == ("h=/base/data/h", "digits", "s3=s3://b/x")


def test_a_restart_at_an_unevaluated_step_evaluates_it_first(tmp_path):
    """A kill between a checkpoint and its step's evaluation: the restart begins with that step."""
    train(toy_trainer(steps=8), InTrainingEval(CFG, str(tmp_path), rank=0), until=2)
    train(toy_trainer(step=4, steps=6), InTrainingEval(CFG, str(tmp_path), rank=0), until=6)
    assert [p["step"] for p in read_evals(str(tmp_path))["points"]] == [0, 2, 4, 6]
