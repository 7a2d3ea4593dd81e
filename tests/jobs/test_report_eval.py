"""The report's evaluation table (jobs/stages/report_eval.py): every column labelled val or test by the metric's role,
the numbers in their cells, fine-tune next to the probes, the transfer score, the split records, in-training points."""

from __future__ import annotations

import json

from vitpipe.jobs.core.store import StageResult
from vitpipe.jobs.stages.report import report_markdown
from vitpipe.jobs.stages.report_eval import table_cells
from vitpipe.jobs.evals.taskspec import make_task

RAW = {
    "cifar10/10shot/mean": 0.30, "cifar10/10shot/std": 0.01, "cifar10/10shot/seed0": 0.29,
    "cifar10.val/10shot/mean": 0.32, "cifar10.val/10shot/std": 0.02,
    "cifar10/knn/k20": 0.41, "cifar10.val/knn/k20": 0.43,
    "cifar10/linear/test_acc": 0.50, "cifar10/linear/val_acc": 0.52, "cifar10/linear/l2": 0.001,
    "cifar10/linear/l2_0.001/val_acc": 0.52, "cifar10/linear/holdout_size": 100.0,
    "digits/10shot/mean": 0.60, "digits/10shot/std": 0.0, "digits.val/10shot/mean": 0.62,
    "digits.val/10shot/std": 0.03, "digits.val/25shot/mean": 0.70, "digits.val/25shot/std": 0.0,
    "digits.val/linear/test_acc": 0.81, "digits/linear/val_acc": 0.99,
}


def test_cells_are_labelled_by_role():
    cells = table_cells(RAW)
    assert cells["cifar10"] == {("10-shot", "test"): "30.0 ± 1.0", ("10-shot", "val"): "32.0 ± 2.0",
                                ("kNN k=20", "test"): "41.0", ("kNN k=20", "val"): "43.0",
                                ("linear", "test"): "50.0", ("linear", "val"): "52.0*"}
    # a validation view's linear score is the validation number; the probe's own held-out slice is not shown then
    assert cells["digits"][("linear", "val")] == "81.0" and ("linear", "test") not in cells["digits"]


def test_report_table_transfer_splits_and_in_training_points(tmp_path):
    digits = make_task("digits")
    few = StageResult(stage="fewshot", key="f", metrics={}, info={
        "raw": {"pretrained": RAW, "random_init": {"digits.val/10shot/mean": 0.2, "digits.val/10shot/std": 0.0}},
        "out_of_domain": ["digits"], "transfer_score": {"pretrained": 0.66, "random_init": 0.25},
        "sizes": {"cifar10": 32, "digits": 32},
        "splits": {"digits": digits.split_info(), "digits.val": digits.validation().split_info()}})
    ft = StageResult(stage="finetune", key="t", info={"task_name": "cifar10", "task": "cifar10=/x", "img_size": 40},
                     metrics={"eval/cifar10/finetune": 0.55, "eval/cifar10.val/finetune_lr_0.01": 0.57,
                              "eval/cifar10.val/finetune_lr_0.03": 0.53, "train/chosen_lr": 0.01})
    (tmp_path / "evals.json").write_text(json.dumps({"settings": {"split": "validation", "test_limit": 500}, "points": [
        {"step": 0, "seconds": 2.0, "metrics": {"digits.val/10shot/mean": 0.3, "digits.val/10shot/std": 0.01}},
        {"step": 100, "seconds": 3.0, "metrics": {"digits.val/10shot/mean": 0.5, "digits.val/10shot/std": 0.02}}]}))
    pre = StageResult(stage="pretrain", key="p", artifacts={"evals": "evals.json"}, url=str(tmp_path))
    md = report_markdown({"pretrain": pre, "fewshot": few, "finetune": ft})
    lines = md.splitlines()
    head = next(ln for ln in lines if ln.startswith("| task |"))
    assert head == ("| task | model | 10-shot val | 10-shot test | 25-shot val | kNN k=20 val | kNN k=20 test | "
                    "linear val | linear test | fine-tune val | fine-tune test |")
    row = next(ln for ln in lines if ln.startswith("| cifar10 (32 px, in-domain) | pretrained |"))
    assert row.endswith("| 32.0 ± 2.0 | 30.0 ± 1.0 |  | 43.0 | 41.0 | 52.0* | 50.0 | 57.0 | 55.0 |")
    assert "| digits (32 px, out-of-domain) | random_init | 20.0 ± 0.0 |" in md
    assert ("**Transfer score** (validation: mean 10- and 25-shot accuracy on the validation views of the "
            "out-of-domain tasks digits): pretrained 66.0%, random init 25.0%") in md
    split_row = next(ln for ln in lines if ln.startswith("| digits | fixed"))
    val = digits.validation().split_info()
    assert f"held out of train: 10% per class, seed 0, digest {val['held_out_digest']}" in split_row
    assert split_row.endswith(f"| {digits.num_train - val['sizes']['test']} / {val['sizes']['test']} / "
                              f"{digits.num_test} |")
    assert ("In-training few-shot (validation, up to 500 images per task, 2 points, 5s in all): digits.val 10-shot "
            "30.0% (step 0) → 50.0% (step 100)") in md
