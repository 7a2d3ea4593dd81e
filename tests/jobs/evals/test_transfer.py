"""Selection protocol helpers: transfer score over validation metrics only, and metric roles for the report."""

import pytest

from vitpipe.jobs.evals.transfer import metric_role, transfer_score, validation_name

METRICS = {
    "pretrained/hymenoptera.val/10shot/mean": 0.70, "pretrained/hymenoptera.val/25shot/mean": 0.80,
    "pretrained/digits.val/10shot/mean": 0.50, "pretrained/digits.val/25shot/mean": 0.60,
    "pretrained/digits.val/5shot/mean": 0.10,
    # Test numbers of the same tasks: must never enter the score.
    "pretrained/hymenoptera/10shot/mean": 0.01, "pretrained/hymenoptera/25shot/mean": 0.01,
    "pretrained/digits/10shot/mean": 0.01, "pretrained/digits/25shot/mean": 0.01,
}


def test_transfer_score_is_the_mean_of_validation_k_shot_means():
    assert transfer_score(METRICS, ["hymenoptera", "digits"], prefix="pretrained/") == pytest.approx(0.65)
    assert transfer_score(METRICS, ["hymenoptera"], shots=(10,), prefix="pretrained/") == pytest.approx(0.70)
    assert transfer_score(METRICS, ["digits.val"], shots=(5, 25), prefix="pretrained/") == pytest.approx(0.35)
    flat = {k.removeprefix("pretrained/"): v for k, v in METRICS.items()}
    assert transfer_score(flat, ["hymenoptera", "digits"]) == pytest.approx(0.65)


def test_transfer_score_refuses_partial_inputs():
    with pytest.raises(ValueError, match=r"2 validation metric\(s\) missing, e.g. \['pretrained/cifar10.val/10shot"):
        transfer_score(METRICS, ["hymenoptera", "cifar10"], prefix="pretrained/")
    with pytest.raises(ValueError, match="at least one task"):
        transfer_score(METRICS, [])


def test_metric_roles():
    assert validation_name("cifar10") == "cifar10.val" == validation_name("cifar10.val")
    assert metric_role("pretrained/cifar10.val/10shot/mean") == "validation"
    assert metric_role("cifar10/linear/val_acc") == "validation"
    assert metric_role("cifar10/linear/l2_0.001/val_acc") == "validation"
    assert metric_role("cifar10/linear/test_acc") == "test"
    assert metric_role("random_init/cifar10/10shot/std") == "test"
    assert metric_role("cifar10/knn/k20") == "test"
    assert metric_role("cifar10/linear/l2") == "setting"
    assert metric_role("cifar10/linear/holdout_size") == "setting"
    assert metric_role("cifar10/10shot/loo/l2_seed0") == "setting"
    assert metric_role("cifar10/10shot/loo/mean") == "test"
