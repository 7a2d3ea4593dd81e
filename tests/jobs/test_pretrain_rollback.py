"""Non-finite losses roll back to the newest complete checkpoint; checkpoints upload asynchronously to S3 (moto on
127.0.0.1); every rank's peak memory reaches MLflow. Real Ray Train + DeepSpeed on the tiny recipe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pytest
import ray.train
from vitpipe.jobs.config import resolve_paths
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.configtools import apply_overrides
from vitpipe.jobs.core.tracking import NullTracker
from vitpipe.jobs.run.runner import run_pipeline
from vitpipe.jobs.stages import stages_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BUCKET = "vitpipe-test"  # tests/conftest.py S3_BUCKET
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def _cfg(store: Path, cifar10_root, *overrides):
    return resolve_paths(apply_overrides(get_recipe("tiny"), [
        f"store={store}", f"data.root={cifar10_root}", "stages=ingest,pretrain", "tracking.enabled=false",
        "pretrain.max_failures=0", *overrides]))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, cifar10_root):
    """The tiny recipe's shards, ingested once; returns (store, manifest URL)."""
    store = tmp_path_factory.mktemp("rollback") / "store"
    cfg = _cfg(store, cifar10_root, "stages=ingest")
    summary = run_pipeline(cfg, stages_for(cfg), parent_tracker=NullTracker(), progress=False)
    return store, summary.results["ingest"].path("manifest")


def _jsonl(url: str) -> list[dict]:
    with fsspec.open(url, "r") as f:
        return [json.loads(line) for line in f]


def test_nan_rolls_back_past_a_damaged_checkpoint_with_async_s3_upload(tmp_path, ingested, cifar10_root, ray_local,
                                                                       s3, mlflow_uri):
    """2 ranks, checkpoints every 2 steps uploaded asynchronously to S3. Rank 1's loss is NaN at step 5; just before
    the rollback the newest checkpoint (step 4) loses half a shard in storage, so the rollback must skip it and load
    step 2, then train on to step 8 with fresh data."""
    from pyarrow.fs import S3FileSystem
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from vitpipe.jobs.core.tracking import MlflowTracker
    from vitpipe.jobs.train.ckpt_manifest import verify
    from vitpipe.jobs.train.hooks import TEST_HOOKS_ENV
    from vitpipe.jobs.train.spec import PretrainSpec, TrackerRef
    from vitpipe.jobs.train.trainer import pretrain_worker

    opts = s3  # the moto server of tests/conftest.py, bucket BUCKET
    port = int(opts["endpoint_url"].rsplit(":", 1)[1])
    cfg = _cfg(ingested[0], cifar10_root, "pretrain.steps=8", "pretrain.checkpoint_every=2", "pretrain.log_every=2",
               "pretrain.keep_checkpoints=2", "pretrain.checkpoint_upload=async")
    tracker = MlflowTracker.start(mlflow_uri, "rollback", "pretrain")
    out_url = str(tmp_path / "out")
    spec = PretrainSpec(model=cfg.model, pretrain=cfg.pretrain, manifest_url=ingested[1], out_url=out_url,
                        tracking=TrackerRef(uri=mlflow_uri, run_id=tracker.run_id))
    hooks = {"nan_step": 5, "nan_rank": 1, "damage_on_rollback": True, "record_weights": True, "record_keys": True}
    worker_tmp = tmp_path / "worker-tmp"  # where the ranks' local checkpoint folders go (and must go away)
    worker_tmp.mkdir()
    storage = S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", access_key="testing",
                           secret_key="testing", region="us-east-1")
    trainer = TorchTrainer(
        pretrain_worker, train_loop_config=spec.to_dict(),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ray", storage_path=f"{BUCKET}/pretrain", storage_filesystem=storage,
                             failure_config=FailureConfig(max_failures=0),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TMPDIR": str(worker_tmp),
                                                              TEST_HOOKS_ENV: json.dumps(hooks), **CREDS}}))
    result = trainer.fit()
    assert result.error is None

    events = _jsonl(f"{out_url}/debug/weights.jsonl")
    saves = [e for e in events if e["event"] == "save"]
    rollbacks = [e for e in events if e["event"] == "rollback"]
    assert [e["step"] for e in saves] == [2, 4, 4, 6, 8]
    assert len(rollbacks) == 1
    rb, at2, first4 = rollbacks[0], saves[0], saves[1]
    # back at step 2 (step 4 was damaged): the checkpoint's exact weights, LR, and DeepSpeed's step count
    assert (rb["step"], rb["engine_step"], rb["digest"], rb["lr"]) == (2, 2, at2["digest"], at2["lr"])
    assert all(e["engine_step"] == e["step"] for e in events)
    assert saves[2]["digest"] != first4["digest"]  # steps 3-4 again, on other batches: the stream moved on

    keys = {}
    for rank in (0, 1):
        for rec in _jsonl(f"{out_url}/debug/keys-rank{rank}.jsonl"):
            keys.setdefault((rank, rec["step"]), []).append(set(rec["keys"]))
    for rank in (0, 1):
        assert [len(keys[(rank, s)]) for s in range(1, 9)] == [1, 1, 2, 2, 1, 1, 1, 1]  # 3 and 4 trained twice
        before, after = keys[(rank, 3)][0] | keys[(rank, 4)][0], keys[(rank, 3)][1] | keys[(rank, 4)][1]
        assert not before & after

    # Ray registered the re-reached steps under new names (the damaged step_00000004 is never written into), and
    # the final checkpoint in S3 lists both ranks' files at their saved sizes.
    name = Path(result.checkpoint.path).name
    assert name.startswith("step_00000008-")
    assert verify(f"s3://{BUCKET}/pretrain/ray/{name}", client_kwargs=opts) == []
    # Ray deleted every rank's local folder once it was uploaded (async mode deletes after the upload)
    assert not [p for p in worker_tmp.rglob("vitpipe-ckpt-*")]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    run = client.get_run(tracker.run_id)
    assert run.data.metrics["train/rollbacks"] == 1 and run.data.metrics["train/skipped_nonfinite"] == 1
    per_rank = {r: client.get_metric_history(tracker.run_id, f"system/peak_rss_gb/rank{r}") for r in (0, 1)}
    peak = client.get_metric_history(tracker.run_id, "system/peak_rss_gb")
    assert len(per_rank[0]) == len(per_rank[1]) == len(peak) >= 4
    for m0, m1, mx in zip(per_rank[0], per_rank[1], peak):
        assert 0.1 < m0.value < 64 and 0.1 < m1.value < 64  # a torch worker's resident set, in GiB
        assert mx.value == max(m0.value, m1.value)
    assert os.path.exists(f"{out_url}/model.pt")


def test_repeated_nan_fails_clearly_after_max_nonfinite(ingested, cifar10_root, ray_local, monkeypatch):
    """1 rank (2 micro-batches per step, sync upload): the second micro-batch of step 3 is NaN every time. The first
    time DeepSpeed's accumulation window is closed and the run rolls back to step 2; the second time is one more
    than pretrain.max_nonfinite=1, and the stage fails saying so."""
    monkeypatch.setenv("VITPIPE_TEST_HOOKS", json.dumps({"nan_step": 3, "nan_micro": 1, "nan_times": 99,
                                                             "record_weights": True}))
    cfg = _cfg(ingested[0], cifar10_root, "pretrain.steps=4", "pretrain.checkpoint_every=1",
               "pretrain.num_workers=1", "pretrain.max_nonfinite=1", "pretrain.checkpoint_upload=sync")
    with pytest.raises((FloatingPointError, ray.train.TrainingFailedError)) as err:  # the rank's error, or Ray Train's
        run_pipeline(cfg, stages_for(cfg), parent_tracker=NullTracker(), progress=False)
    msg = str(err.value)
    assert "FloatingPointError" in msg or isinstance(err.value, FloatingPointError), msg
    assert "2 non-finite losses, more than pretrain.max_nonfinite=1" in msg and "after 1 rollback(s)" in msg, msg

    (url,) = [str(p) for p in (ingested[0] / "stages" / "pretrain").iterdir() if (p / "debug").is_dir()]
    events = _jsonl(f"{url}/debug/weights.jsonl")
    assert [(e["event"], e["step"]) for e in events] == [("save", 1), ("save", 2), ("rollback", 2)]
    assert events[2]["digest"] == events[1]["digest"] and events[2]["engine_step"] == 2
    # the half-done step was closed with a zero-gradient pass: DeepSpeed's accumulation window stays aligned
    assert [e["micro_steps"] for e in events] == [2, 4, 6]
