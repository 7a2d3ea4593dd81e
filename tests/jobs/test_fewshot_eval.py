"""The fewshot stage's per-task loop (jobs/stages/fewshot_eval.py) against independent computations: the kNN vote and
the few-shot and linear probes on features embedded separately, the validation view carved from train only, every
image embedded once for all evaluators and both views, the task's own resolution, the transfer score's mean."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vitpipe.jobs.evals.features import make_embed_fn
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval
from vitpipe.jobs.evals.knn import KnnConfig, knn_predict
from vitpipe.jobs.evals.linear_probe import LinearProbeConfig, linear_eval
from vitpipe.jobs.stages.fewshot import FewshotStageConfig
from vitpipe.jobs.stages.fewshot_eval import evaluate_task, transfer_scores
from vitpipe.jobs.evals.taskspec import make_task, model_at_resolution
from vitpipe.models import ViTConfig, create
from vitpipe.pipeline.tasks import index_digest

MCFG = ViTConfig.from_name("mu/4", img_size=32, num_classes=10)
PROBE = FewshotConfig(shots=(10, 25), seeds=(0,), test_limit=150)
KNN = KnnConfig(ks=(5, 20), test_limit=150)
LINEAR = LinearProbeConfig(l2_grid=(1e-2, 1.0), train_limit=400, test_limit=150)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create(MCFG).eval()


def test_every_evaluator_on_test_and_validation_views_matches_independent_runs(model):
    seen: dict[tuple[str, str], list[int]] = {}

    def count(embed, desc):
        def fn(split, indices):
            seen.setdefault((desc, split), []).extend(np.asarray(indices).tolist())
            return embed(split, indices)
        return fn

    evs = (("fewshot", PROBE), ("knn", KNN), ("linear", LINEAR))
    res = evaluate_task("digits", {"pretrained": (model, "m0")}, MCFG, evaluators={"pretrained": evs},
                        validation={"pretrained": evs[:2]}, wrap=count)
    raw = res.raw["pretrained"]
    task = make_task("digits")
    val = task.validation()
    assert res.size == 32 and set(res.splits) == {"digits", "digits.val"}
    assert res.splits["digits.val"]["held_out_digest"] == index_digest(val.source("test", None)[1])
    assert res.splits["digits.val"]["from_split"] == "train"  # carved from train, never from test

    embed = make_embed_fn(model, task, img_size=32)
    train, test = embed("train", np.arange(task.num_train)), embed("test", np.arange(task.num_test))
    kept, held = val.source("train", None)[1], val.source("test", None)[1]
    # kNN on the validation view: bank = train minus the held-out slice, queries = the slice (test_limit subset)
    q = np.sort(np.random.default_rng(KNN.seed + 1).choice(held.size, 150, replace=False)) if held.size > 150 else \
        np.arange(held.size)
    pred = knn_predict(train[kept], task.train_labels[kept], train[held[q]], 10, (5, 20))
    for k in (5, 20):
        assert raw[f"digits.val/knn/k{k}"] == pytest.approx(np.mean(pred[k] == task.train_labels[held[q]]), abs=1e-12)
    # few-shot and linear probes on the test split, run directly
    assert {k: v for k, v in raw.items() if k.startswith("digits/") and "shot" in k} == pytest.approx(
        fewshot_eval(lambda s, i: (train if s == "train" else test)[i], task, PROBE), abs=1e-12)
    direct = linear_eval(lambda s, i: (train if s == "train" else test)[i], task, LINEAR)
    assert {k: raw[k] for k in direct} == pytest.approx(direct, abs=1e-9)
    # one embedding per image for both views and all evaluators (the memo reads the view's rows from the task's)
    root: dict[str, list[int]] = {}
    for (desc, split), idx in seen.items():
        rs, ri = val.source(split, idx) if desc.startswith("digits.val") else (split, np.asarray(idx))
        root.setdefault(rs, []).extend(ri.tolist())
    assert all(len(v) == len(set(v)) for v in root.values()) and len(root["train"]) > 1000


def test_task_resolution_and_transfer_score(model):
    evs = (("fewshot", PROBE),)
    res = evaluate_task("digits@48", {"pretrained": (model, "m0"), "random_init": (model, "m0")}, MCFG,
                        evaluators={"pretrained": evs}, validation={"pretrained": evs, "random_init": evs})
    assert res.name == "digits_48px" and res.size == 48
    big = model_at_resolution(model, MCFG, 48)
    val = make_task("digits@48").validation()
    ref = fewshot_eval(make_embed_fn(big, val, img_size=48), val, PROBE)
    assert {k: res.raw["pretrained"][k] for k in ref} == pytest.approx(ref, abs=1e-12)
    assert "digits_48px/10shot/mean" not in res.raw["random_init"]  # the baseline ran on the validation view only
    want = np.mean([ref["digits_48px.val/10shot/mean"], ref["digits_48px.val/25shot/mean"]])
    assert transfer_scores(res.raw, ("digits_48px",)) == pytest.approx({"pretrained": want, "random_init": want})
    assert transfer_scores(res.raw, ("digits_48px", "other")) == {}  # never from part of the tasks


def test_stage_config_checks_and_lists():
    fc = FewshotStageConfig(baseline_evaluators=("fewshot", "knn"), validation_evaluators=("fewshot",))
    test, val = fc.evaluator_lists(baseline=True)
    assert [t for t, _ in test] == ["fewshot", "knn"] and [t for t, _ in val] == ["fewshot"]
    # validation views only: the baseline's test lists are empty, the pretrained model's are untouched
    fv = FewshotStageConfig(baseline_evaluators=("fewshot", "knn"), validation_evaluators=("fewshot",),
                            baseline_views="validation")
    assert fv.evaluator_lists(baseline=True) == ((), val)
    assert fv.evaluator_lists(baseline=False) == fc.evaluator_lists(baseline=False)
    with pytest.raises(ValueError, match="^fewshot.baseline_views must be 'both' or 'validation', got 'test'"):
        FewshotStageConfig(baseline_views="test")
    with pytest.raises(ValueError, match="^fewshot.evaluators has unknown evaluator 'svm'"):
        FewshotStageConfig(evaluators=("svm",))
    with pytest.raises(ValueError, match="fewshot.out_of_domain needs 'fewshot' in fewshot.validation_evaluators"):
        FewshotStageConfig(validation_evaluators=("knn",), out_of_domain=("digits",))
