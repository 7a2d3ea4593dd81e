"""A worker SIGKILLed mid-epoch: Ray Train restarts the group from the last checkpoint, and the run ends with the
same weights as an uninterrupted one and the same samples at every step (none twice, none skipped). The killed run
also evaluates few-shot in training (the uninterrupted one does not: same weights, so evaluation never perturbs
training): its MLflow run has the curve at every evaluation step exactly once across the restart."""

from __future__ import annotations

import json

import fsspec
import pytest
import ray.train
import torch
from vitpipe.jobs.config import resolve_paths
from vitpipe.jobs.config.recipes import get_recipe
from vitpipe.jobs.core.configtools import apply_overrides
from vitpipe.jobs.core.tracking import NullTracker
from vitpipe.jobs.run.runner import run_pipeline
from vitpipe.jobs.stages import stages_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(tmp_path, name, cifar10_root, monkeypatch, debug, *overrides, tracked=False):
    monkeypatch.setenv("VITPIPE_TEST_HOOKS", json.dumps(debug))
    cfg = resolve_paths(apply_overrides(get_recipe("tiny"), [
        f"store={tmp_path / name}", f"data.root={cifar10_root}", "stages=ingest,pretrain",
        "pretrain.steps=8", "pretrain.checkpoint_every=3", "pretrain.max_failures=1",
        f"tracking.enabled={str(tracked).lower()}", "tracking.register_model=false",
        "pretrain.evals.max_stall=none", *overrides]))  # every evaluation step, however slow the machine
    summary = run_pipeline(cfg, stages_for(cfg), parent_tracker=None if tracked else NullTracker(), progress=False)
    _run.last = summary
    url = summary.results["pretrain"].url
    with fsspec.open(f"{url}/model.pt", "rb") as f:
        weights = torch.load(f, weights_only=True)
    keys = {}
    for rank in (0, 1, "resume"):
        if rank == "resume" and not fsspec.filesystem("file").exists(f"{url}/debug/keys-rankresume.jsonl"):
            continue
        with fsspec.open(f"{url}/debug/keys-rank{rank}.jsonl", "r") as f:
            for line in f:  # a step replayed after the restart overwrites what the killed worker recorded
                rec = json.loads(line)
                keys[(rank, rec["step"])] = rec["keys"]
    return weights, keys


def test_killed_worker_resumes_to_identical_weights(tmp_path, cifar10_root, ray_local, monkeypatch):
    ref_w, ref_keys = _run(tmp_path, "ref", cifar10_root, monkeypatch, {"record_keys": True},
                           "pretrain.evals.tasks=[]")
    got_w, got_keys = _run(tmp_path, "killed", cifar10_root, monkeypatch,
                           {"record_keys": True, "kill_rank": 1, "kill_after_step": 6}, "pretrain.evals.every=2",
                           tracked=True)
    assert {k: v for k, v in got_keys.items() if k[0] != "resume"} == ref_keys
    assert any(k[0] == "resume" for k in got_keys)  # the group really was restarted from a checkpoint
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        assert torch.allclose(ref_w[name], got_w[name], atol=1e-6, rtol=0), name
    # In-training few-shot: steps 0, 2, 4, 6 and the last (8), each once in the stage's MLflow run although the
    # restart re-ran the steps after its checkpoint (3 or 6); the record in the stage folder agrees.
    from mlflow.tracking import MlflowClient

    killed = _run.last
    pre = killed.results["pretrain"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'killed' / 'mlflow.db'}")
    for name in ("eval/digits.val/5shot", "eval/digits.val/5shot_std", "train/eval_seconds"):
        assert sorted(m.step for m in client.get_metric_history(pre.mlflow_run_id, name)) == [0, 2, 4, 6, 8], name
    with fsspec.open(f"{pre.url}/evals.json", "r") as f:
        points = json.load(f)["points"]
    assert [p["step"] for p in points] == [0, 2, 4, 6, 8] and pre.artifacts["evals"] == "evals.json"
    curve = {m.step: m.value for m in client.get_metric_history(pre.mlflow_run_id, "eval/digits.val/5shot")}
    assert curve == {p["step"]: p["metrics"]["digits.val/5shot/mean"] for p in points}

    # within the first epoch (9 batches of 16 per rank) no sample appears twice
    first_epoch = [k for (r, s), ks in ref_keys.items() if s <= 8 for k in ks]
    assert len(first_epoch) == len(set(first_epoch))

    # Elastic: the 2-rank run dies for good (no restarts left); `vitpipe run` again on ONE rank resumes the same
    # stage (topology is not part of its key) from its last checkpoint through a DeepSpeed universal checkpoint.
    with pytest.raises(ray.train.TrainingFailedError):  # no restarts left: Ray Train gives up
        _run(tmp_path, "elastic", cifar10_root, monkeypatch, {"record_keys": True, "kill_rank": 1,
                                                              "kill_after_step": 6}, "pretrain.max_failures=0")
    el_w, el_keys = _run(tmp_path, "elastic", cifar10_root, monkeypatch, {"record_keys": True},
                         "pretrain.num_workers=1", "pretrain.max_failures=0")
    # where the 1-rank run picked up: the last checkpoint Ray registered before the kill (step 3 or 6)
    start = max(s for (r, s) in el_keys if r == "resume")
    assert start in (3, 6)
    resumed = sorted(s for (r, s) in el_keys if r == 0 and s > start)
    assert resumed == list(range(start + 1, 9))
    # The unseen rest of the epoch is re-split over one rank: the resumed steps see only samples that the
    # checkpointed steps 1..start did not (exactly once across the change of world size).
    seen_before = {k for (r, s), ks in el_keys.items() if r in (0, 1) and s <= start for k in ks}
    after = [k for s in resumed for k in el_keys[(0, s)]]
    assert len(after) == len(resumed) * 32 and len(set(after)) == len(after) and not seen_before & set(after)
    assert seen_before == {k for (r, s), ks in ref_keys.items() if s <= start for k in ks}  # same first steps
    assert all(torch.isfinite(v).all() for v in el_w.values())
    # the second `vitpipe run` continued the failed one's in-training record (tiny: every 3 steps and the last)
    with fsspec.open(f"{_run.last.results['pretrain'].url}/evals.json", "r") as f:
        assert [p["step"] for p in json.load(f)["points"]] == [0, 3, 6, 8]
