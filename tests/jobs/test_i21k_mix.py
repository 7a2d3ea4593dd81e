"""An ImageNet-21k recipe (the paper's setting + an AugReg preset) shrunk to CIFAR folders, through every stage,
pretraining on a weighted mix of two ingested shard sets: real Ray Train + DeepSpeed + MLflow."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from vitpipe.jobs.config import build_config
from vitpipe.jobs.run.runner import run_pipeline
from vitpipe.jobs.stages import stages_for
from vitpipe.pipeline import IngestConfig, ingest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_i21k_recipe_with_augreg_and_a_weighted_mix_runs_every_stage(tmp_path, cifar10_root, ray_local, mlflow_uri):
    # a second ingested shard set: 10 CIFAR-10 test images per class, mixed in at half the weight
    other = tmp_path / "other"
    ingest(str(cifar10_root), str(other), IngestConfig(split="test", limit_per_class=10, shard_max_samples=50,
                                                       num_workers=0))
    sources = [{"url": "ingest", "weight": 1.0}, {"url": str(other / "manifest.json"), "weight": 0.5,
                                                  "name": "extra"}]
    task = f"cifar10={cifar10_root}"
    cfg = build_config("i21k-s16", [
        f"store={tmp_path / 'store'}", f"data.root={cifar10_root}", "data.dedup_tasks=digits",
        "ingest.split=train", "ingest.limit_per_class=30", "ingest.shard_max_samples=64", "ingest.resize_short=none",
        "ingest.shard_max_bytes=none", "ingest.num_workers=2",
        "model=mu/4", "model.img_size=32", "model.dropout=0.1", "model.classifier_bias_init=-10",
        "pretrain.steps=6", "pretrain.global_batch=32", "pretrain.micro_batch=16", "pretrain.warmup_steps=2",
        "pretrain.checkpoint_every=3", "pretrain.log_every=2", "pretrain.use_gpu=false", "pretrain.num_workers=2",
        "pretrain.cpus_per_worker=1", "pretrain.precision=auto", "pretrain.peak_tflops=none",
        "pretrain.stream.img_size=32", "pretrain.stream.num_workers=0", "pretrain.stream.pin_memory=false",
        "pretrain.stream.shuffle_buffer=64", "pretrain.augreg=light2", f"pretrain.sources={json.dumps(sources)}",
        f"fewshot.tasks={task},digits", "fewshot.probe.shots=1,5", "fewshot.probe.seeds=0",
        "fewshot.probe.test_limit=200", "fewshot.knn.train_limit=300", "fewshot.knn.test_limit=200",
        "fewshot.linear.train_limit=300", "fewshot.linear.test_limit=200", "fewshot.linear.l2_grid=0.001,0.1",
        f"finetune.task={task}", "finetune.img_size=40", "finetune.steps=4",
        "finetune.batch_size=16", "finetune.warmup_steps=1", "finetune.train_limit=200", "finetune.test_limit=100",
        "finetune.lr_grid=0.01", "finetune.ema_decay=none", "finetune.num_workers=1", "finetune.cpus_per_worker=1",
        "finetune.log_every=2", f"analysis.task={task}", "analysis.num_images=8",
    ])
    assert cfg.pretrain.loss == "sigmoid" and cfg.pretrain.weight_decay == 0.03 and cfg.pretrain.lr == 1e-3
    summary = run_pipeline(cfg, stages_for(cfg), tracking_uri=mlflow_uri, progress=False)
    assert summary.status == "FINISHED" and set(summary.statuses) == set(cfg.stages)
    assert set(summary.statuses.values()) == {"ran"}

    client = MlflowClient(mlflow_uri)
    pre = client.get_run(summary.results["pretrain"].mlflow_run_id)
    assert pre.data.params["pretrain.augreg"] == "light2"
    # 6 steps x 32 images over 2 ranks, drawn 2:1 from the two sources (exact quotas per epoch; a partial epoch's
    # prefix stays within a few samples of the weights)
    ing, extra = pre.data.metrics["train/data/source_samples/ingest"], pre.data.metrics["train/data/source_samples/extra"]
    assert ing + extra == 6 * 32
    assert abs(extra - 6 * 32 / 3) <= 4, (ing, extra)
    assert summary.results["pretrain"].info["num_classes"] == 10  # the two sources' class maps are the same names
    # the run learned under Mixup + RandAugment with the sigmoid loss (bias -10: the loss starts near 10 x 10 ...)
    losses = [m.value for m in client.get_metric_history(pre.info.run_id, "train/loss")]
    assert len(losses) == 3 and losses[-1] < losses[0]
