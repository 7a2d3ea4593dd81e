"""The metric-name scheme: evaluator results as eval/<task>/..., and what the parent run shows of its stages."""

from __future__ import annotations

import pytest

from vitpipe.jobs.core.metric_names import STAGE_SECONDS, eval_metrics, parent_metrics


def test_evaluator_results_become_eval_task_names_without_per_seed_values():
    res = {"cifar10/5shot/seed0": 0.25, "cifar10/5shot/seed1": 0.35, "cifar10/5shot/mean": 0.3,
           "cifar10/5shot/std": 0.05, "cifar10/5shot/l2_1024/mean": 0.28, "cifar10/5shot/loo/l2_seed0": 1024.0,
           "cifar10/5shot/loo/mean": 0.31, "cifar10/5shot/loo/std": 0.02, "digits.val/10shot/mean": 0.9,
           "digits/knn/k20": 0.8, "digits/linear/test_acc": 0.85}
    assert eval_metrics(res) == {
        "eval/cifar10/5shot": 0.3, "eval/cifar10/5shot_std": 0.05, "eval/cifar10/5shot_l2_1024": 0.28,
        "eval/cifar10/5shot_loo": 0.31, "eval/cifar10/5shot_loo_std": 0.02, "eval/digits.val/10shot": 0.9,
        "eval/digits/knn_k20": 0.8, "eval/digits/linear_test_acc": 0.85}
    assert eval_metrics({"cifar10/5shot/mean": 0.1, "cifar10/5shot/std": 0.0}, "random_init") == {
        "eval/cifar10/random_init/5shot": 0.1, "eval/cifar10/random_init/5shot_std": 0.0}
    with pytest.raises(ValueError, match="'accuracy' is not <task>/<name>"):
        eval_metrics({"accuracy": 1.0})


def test_parent_run_shows_each_stage_result_once_bare_names_under_their_stage():
    got = parent_metrics({"ingest": {"num_samples": 500, "num_classes": 10},
                          "fewshot": {"eval/cifar10/5shot": 0.3},
                          "finetune": {"eval/cifar10/finetune": 0.5, "train/chosen_lr": 0.01},
                          "report": {"note": "text", "flag": True}})
    assert got == {"ingest/num_samples": 500.0, "ingest/num_classes": 10.0, "eval/cifar10/5shot": 0.3,
                   "eval/cifar10/finetune": 0.5, "train/chosen_lr": 0.01}
    assert STAGE_SECONDS == "system/stage_seconds"  # on the System metrics tab, with MLflow's own
