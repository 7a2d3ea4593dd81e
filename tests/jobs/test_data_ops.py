"""Ingest fanned out as Ray tasks writes exactly what the local ingest writes; the CLI verbs give one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitpipe.jobs.stages.ingest import ray_ingest
from vitpipe.pipeline import IngestConfig, ingest


@pytest.mark.integration
def test_ray_ingest_matches_local_ingest(tmp_path, cifar10_root, ray_local):
    cfg = IngestConfig(split="test", limit_per_class=12, shard_max_samples=25, num_workers=1)
    local = ingest(str(cifar10_root), str(tmp_path / "local"), cfg)
    remote = ray_ingest(str(cifar10_root), str(tmp_path / "ray"), cfg, progress=False)
    assert [(s.name, s.num_samples, s.sha256) for s in remote.shards] == \
           [(s.name, s.num_samples, s.sha256) for s in local.shards]
    assert remote.classes == local.classes and remote.num_samples == 120


def test_ingest_cli_missing_source_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "vitpipe.jobs.cli", "ingest", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stdout + proc.stderr


def test_ingested_shard_sets_are_a_task(tmp_path, cifar10_root):
    """Tasks are data: an ingested train/test shard pair serves the same images as the folder it came from."""
    import numpy as np

    from vitpipe.jobs.evals.taskspec import make_task

    for split in ("train", "test"):
        ingest(str(cifar10_root), str(tmp_path / split), IngestConfig(split=split, limit_per_class=3,
                                                                     shard_max_samples=7, num_workers=1))
    task = make_task(f"c10=shards:{tmp_path / 'train' / 'manifest.json'},{tmp_path / 'test' / 'manifest.json'}")
    assert task.name == "c10" and len(task.classes) == 10 and task.num_train == 30 and task.num_test == 30
    img = task.load("test", [5])[0]
    assert img.size == (32, 32)
    folder = make_task(f"c10={cifar10_root}")
    label = task.classes[task.test_labels[5]]
    first3 = np.where(folder.test_labels == folder.classes.index(label))[0][:3]  # ingest kept the first 3 per class
    candidates = [np.asarray(im) for im in folder.load("test", first3)]
    assert any(np.array_equal(np.asarray(img), c) for c in candidates)
