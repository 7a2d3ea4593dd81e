"""The walking skeleton end to end: real shards, real Ray Train + DeepSpeed, real MLflow (sqlite), tiny recipe."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from cluster_services import TINY_SETS
from mlflow.tracking import MlflowClient

from vitpipe.jobs.stages import stages_for
from vitpipe.jobs.config import build_config
from vitpipe.jobs.run.runner import RunSummary, run_pipeline

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _cfg(tmp_path, *overrides):
    return build_config("tiny", [*TINY_SETS, *overrides], str(tmp_path / "store"))


def _children(client, parent_id):
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.data.tags["vitpipe.stage"]: r for r in runs if "vitpipe.stage" in r.data.tags}


def test_tiny_pipeline_runs_caches_and_reruns_one_stage(tiny_run, cifar10_root):
    # the session's shared tiny run (tests/jobs/conftest.py: `vitpipe run tiny` through the CLI, every stage)
    assert tiny_run.exit_code == 0, f"{tiny_run.output}\n{tiny_run.exception!r}"
    rec, store = tiny_run.record, str(tiny_run.store)
    first = RunSummary(run_id=rec["run_id"], status=rec["status"], results=tiny_run.results,
                       statuses={s: v["status"] for s, v in rec["stages"].items()}, mlflow_run_id=rec["mlflow_run_id"])
    mlflow_uri = rec["tracking_uri"]
    cfg = build_config("tiny", tiny_run.sets, store)  # as the CLI built it: the reruns below key the same
    assert first.status == "FINISHED"
    assert set(first.statuses.values()) == {"ran"}

    client = MlflowClient(mlflow_uri)
    parent = client.get_run(first.mlflow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.zero_stage"] == "2"  # the resolved config is logged as params
    assert {"config.json", "report.md"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    kids = _children(client, first.mlflow_run_id)
    assert set(kids) == set(cfg.stages)
    assert all(k.info.status == "FINISHED" for k in kids.values())
    losses = client.get_metric_history(kids["pretrain"].info.run_id, "train/loss")
    assert len(losses) == cfg.pretrain.steps // cfg.pretrain.log_every  # per-step logging from rank 0
    for m in ("train/lr", "train/images_per_s", "train/grad_norm"):
        assert client.get_metric_history(kids["pretrain"].info.run_id, m)
    few = kids["fewshot"].data.metrics
    assert {"eval/cifar10/5shot", "eval/cifar10/5shot_std", "eval/cifar10/random_init/5shot"} <= set(few)
    assert not [k for k in few if "seed" in k]  # per-seed values stay in the stored result, not in MLflow
    assert 0.0 <= kids["finetune"].data.metrics["eval/cifar10/finetune"] <= 1.0
    assert client.get_metric_history(kids["finetune"].info.run_id, "train/loss")
    # the parent shows each stage's results once and the stage times; the report stage copies none of them
    assert parent.data.metrics["eval/cifar10/5shot"] == few["eval/cifar10/5shot"]
    assert {f"system/stage_seconds/{s}" for s in cfg.stages} <= set(parent.data.metrics)
    assert not kids["report"].data.metrics.keys() - {"system/stage_seconds"}
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # the pretraining data is the pretrain run's dataset input: the ingested manifest minus dedup's exclusions
    (data,) = kids["pretrain"].inputs.dataset_inputs
    ingested, excluded = first.results["ingest"].metrics["num_samples"], first.results["dedup"].metrics["excluded"]
    assert (data.dataset.name, json.loads(data.dataset.source)["uri"]) == \
        ("cifar10-train", first.results["ingest"].path("manifest"))
    assert json.loads(data.dataset.profile)["num_samples"] == ingested - excluded
    assert "manifest.json" in {a.path for a in client.list_artifacts(kids["ingest"].info.run_id)}
    figs = {a.path for a in client.list_artifacts(kids["analysis"].info.run_id, "figures")}
    assert "figures/attention_distance.png" in figs

    # The pretrained model is registered and loads as a pyfunc classifier of an image batch.
    import mlflow.pyfunc
    import numpy as np
    from PIL import Image

    mlflow.set_tracking_uri(mlflow_uri)
    uri = first.results["report"].info["registered_model"]
    assert uri.startswith("models:/vitpipe-tiny/")
    clf = mlflow.pyfunc.load_model(uri)
    # logged as code (jobs/pyfunc_entry.py), not as a cloudpickle of the class
    assert clf.metadata.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    imgs = np.stack([np.asarray(Image.open(p).convert("RGB"))
                     for p in sorted((cifar10_root / "test" / "cat").glob("*.jpg"))[:4]])
    probs = clf.predict(imgs)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)

    # Same recipe again: every stage cached, and said so in MLflow.
    second = run_pipeline(cfg, stages_for(cfg), tracking_uri=mlflow_uri, progress=False)
    assert set(second.statuses.values()) == {"cached"}
    kids2 = _children(client, second.mlflow_run_id)
    assert kids2["pretrain"].data.tags["cached"] == "true"
    assert kids2["pretrain"].data.tags["produced_by"] == kids["pretrain"].info.run_id

    # A fine-tune override reruns only fine-tune and what reads it; an LR grid is searched on a held-out slice of
    # train, each grid point a nested MLflow run under the fine-tune stage's run.
    cfg3 = build_config("tiny", [*tiny_run.sets, "finetune.lr_grid=0.003,0.03", "finetune.grid_steps=2"], store)
    third = run_pipeline(cfg3, stages_for(cfg3), tracking_uri=mlflow_uri, progress=False)
    ran = {s for s, v in third.statuses.items() if v == "ran"}
    assert ran == {"finetune", "analysis", "report"}
    assert third.results["pretrain"].key == first.results["pretrain"].key
    ft = third.results["finetune"].metrics
    assert ft["train/chosen_lr"] in (0.003, 0.03)
    assert {"eval/cifar10.val/finetune_lr_0.003", "eval/cifar10.val/finetune_lr_0.03"} <= set(ft)
    ft_run = _children(client, third.mlflow_run_id)["finetune"].info.run_id
    grid = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{ft_run}'")
    assert sorted(r.data.params["lr"] for r in grid) == ["0.003", "0.03"]
    assert all("eval/cifar10.val/finetune" in r.data.metrics for r in grid)


def test_cli_user_errors_are_one_line(tmp_path):
    cases = [(["--set", "pretrain.lrr=1"], "unknown config key 'pretrain.lrr'"),
             (["--set", "pretrain.steps=abc"], "'pretrain.steps' expects an integer"),
             (["--set", f"data.root={tmp_path / 'missing'}", "--set", "tracking.enabled=false"], "no such folder"),
             (["nosuchrecipe"], "unknown recipe 'nosuchrecipe'")]
    for args, message in cases:
        if args[0] != "nosuchrecipe":
            args = ["tiny", *args]
        proc = subprocess.run([sys.executable, "-m", "vitpipe.jobs.cli", "run", *args, "--store",
                               str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        out = proc.stdout.strip().splitlines()
        # A config error before the run is the last line; one a stage meets (the missing folder, found by ingest)
        # is its one-line failure, followed only by where the full log is.
        if out[-1].lstrip().startswith("full log: "):
            out = out[:-1]
            assert out[-1].startswith("✗ ingest failed: ") and message in out[-1], proc.stdout
        else:
            assert message in out[-1] and out[-1].startswith("error:"), proc.stdout
        assert sum(message in line for line in out) == 1, proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr


def test_mpp_objective_pretrains_and_feeds_the_same_evals(tmp_path, cifar10_root, ray_local):
    """Masked patch prediction (paper §4.6) selected by config; its encoder goes through the same few-shot stage."""
    cfg = _cfg(tmp_path, "pretrain.objective=mpp", "stages=ingest,pretrain,fewshot",
               "tracking.enabled=false", "fewshot.random_init_baseline=false", "fewshot.tasks=digits")
    summary = run_pipeline(cfg, stages_for(cfg), progress=False)
    pre = summary.results["pretrain"]
    assert pre.info["final"]["train/loss"] < 6.2383  # below log(512): the colour head learned something in 6 steps
    import fsspec
    with fsspec.open(f"{pre.url}/model.json") as f:
        assert json.load(f)["objective"] == "mpp"
    assert 0.0 < summary.results["fewshot"].metrics["eval/digits/5shot"] <= 1.0
