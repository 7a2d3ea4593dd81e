"""Ingest fanned out as Ray tasks writes exactly what the local ingest writes; the CLI verbs give one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitpipe.jobs.data_ops import ray_ingest
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
