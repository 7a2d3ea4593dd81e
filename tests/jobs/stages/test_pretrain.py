"""The pretrain stage's dataset inputs: what its MLflow run says it trains on (real shards, a real sqlite store)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from vitpipe.jobs.stages.pretrain import fit_timing, training_datasets
from vitpipe.jobs.core.tracking import MlflowTracker
from vitpipe.jobs.train.config import PretrainConfig
from vitpipe.jobs.train.spec import PretrainSpec
from vitpipe.models import ViTConfig
from vitpipe.pipeline import IngestConfig, Manifest, SourceSpec, ingest
from vitpipe.pipeline.subset import read_label_index


def _shards(tmp_path, name: str, seed: int, per_class: int = 4) -> tuple[str, str]:
    """An image folder <name>/train/{ants,bees}/ ingested into shards of 3; (manifest URL, image folder)."""
    rng = np.random.default_rng(seed)
    root = tmp_path / name
    for c in ("ants", "bees"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "train" / c / f"{i}.jpg")
    dest = tmp_path / f"{name}-shards"
    ingest(str(root), str(dest), IngestConfig(split="train", shard_max_samples=3, num_workers=1))
    return str(dest / "manifest.json"), str(root)


def _inputs(tracker: MlflowTracker, spec: PretrainSpec) -> dict:
    run = tracker.child("pretrain")
    for d in training_datasets(spec):
        run.dataset(**d)
    got = {}
    for d in run.client.get_run(run.run_id).inputs.dataset_inputs:
        ds = d.dataset
        assert ds.source_type == "local" and {(t.key, t.value) for t in d.tags} == {("mlflow.data.context", "training")}
        got[ds.name] = (json.loads(ds.source)["uri"], ds.digest, json.loads(ds.profile))
    return got


@pytest.fixture(scope="module")
def tracker(tmp_path_factory) -> MlflowTracker:
    tmp = tmp_path_factory.mktemp("mlflow")
    return MlflowTracker.start(f"sqlite:///{tmp / 'mlflow.db'}", "vitpipe", "parent", artifact_location=str(tmp))


def test_pretraining_data_is_the_runs_dataset_input(tmp_path, tracker):
    url, folder = _shards(tmp_path, "bugs", seed=0)
    base = PretrainSpec(model=ViTConfig.from_name("Ti/4", img_size=32, num_classes=2), pretrain=PretrainConfig(),
                        manifest_url=url, out_url=str(tmp_path / "out"))
    got = _inputs(tracker, base)
    assert list(got) == ["bugs-train"]
    source, digest, profile = got["bugs-train"]
    assert source == url and len(digest) == 10 and int(digest, 16) >= 0
    assert profile == {"num_samples": 8, "num_shards": 3, "num_classes": 2, "num_excluded": 0, "limit": None,
                       "ingested_from": folder}
    assert _inputs(tracker, base)["bugs-train"][1] == digest  # the same data: the same digest

    # Two near-duplicates excluded (the dedup stage's list): fewer samples, another digest.
    (keys, _), *_ = read_label_index(Manifest.load(url))
    exclude = tmp_path / "exclude.json"
    exclude.write_text(json.dumps({"shard-000000.tar": keys[:2]}))
    _, d_excl, p_excl = _inputs(tracker, replace(base, exclude_url=str(exclude)))["bugs-train"]
    assert (p_excl["num_samples"], p_excl["num_excluded"]) == (6, 2) and d_excl != digest

    # A class-balanced subset of 4: its size, another digest.
    sub = replace(base, pretrain=replace(base.pretrain, stream=replace(base.pretrain.stream, limit=4)))
    _, d_sub, p_sub = _inputs(tracker, sub)["bugs-train"]
    assert (p_sub["num_samples"], p_sub["limit"]) == (4, 4) and d_sub not in (digest, d_excl)

    # A weighted mix: one input per source, by source name, with its weight.
    url2, _ = _shards(tmp_path, "more", seed=1, per_class=3)
    mix = replace(base, sources=(SourceSpec(url=url, name="ingest", weight=3.0), SourceSpec(url=url2, name="more")))
    got = _inputs(tracker, mix)
    assert {k: (v[0], v[2]["num_samples"], v[2]["weight"]) for k, v in got.items()} == \
        {"ingest": (url, 8, 3.0), "more": (url2, 6, 1.0)}
    assert got["ingest"][1] == digest and got["more"][1] != digest


def test_fit_timing_splits_the_worker_start_by_rank_0s_milestones():
    marks = {"entered": 9.0, "ready": 12.5, "start": 16.0, "end": 116.0, "fit_returned": 118.0}
    assert fit_timing(marks) == pytest.approx({"workers_start_s": 16.0, "group_start_s": 9.0, "setup_s": 3.5,
                                               "first_step_wait_s": 3.5, "train_s": 100.0, "finish_s": 2.0})
    # without the milestones (no feed callback on rank 0): the totals only
    assert fit_timing({"start": 16.0, "end": 116.0}) == {"workers_start_s": 16.0, "train_s": 100.0}
    assert fit_timing({"fit_returned": 5.0}) == {"fit_s": 5.0}
