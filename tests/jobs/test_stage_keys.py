"""One cache-key rule for every stage: runtime fields (workers, threads, loader and upload settings, logging) never
change a key; fields that change results always do."""

from __future__ import annotations

import dataclasses

import pytest

from vitpipe.jobs.config import build_config
from vitpipe.jobs.core.configtools import apply_overrides
from vitpipe.jobs.core.store import Store
from vitpipe.jobs.run.graph import plan
from vitpipe.jobs.stages import stages_for
from vitpipe.pipeline.fields import affects_result


def _keys(cfg, tmp_path) -> dict[str, str]:
    return {it.stage.name: it.key for it in plan(cfg, stages_for(cfg), Store(str(tmp_path)))}


def _runtime_paths(obj, prefix=""):
    """Dotted paths of every runtime field in a config tree, with a value different from the current one."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _runtime_paths(value, path + ".")
        elif not affects_result(f):
            yield path, _other(value, f)


def _other(value, f):
    if isinstance(value, bool):
        return str(not value).lower()
    if isinstance(value, int):
        return str(value + 1) if f.name != "micro_batch" else "32"
    if isinstance(value, float):
        return str(value * 2)
    if value is None:
        return "4" if "thread" in f.name or "tflops" in f.name else "1"
    if f.name == "placement_strategy":
        return "SPREAD"
    if f.name == "checkpoint_upload":
        return "sync"
    if f.name == "compile":
        return "inductor"
    if isinstance(value, dict):
        return '{"anon": true}'
    raise AssertionError(f"no alternative value for runtime field {f.name}={value!r}")


@pytest.fixture(scope="module")
def demo():
    return build_config("demo")


def test_every_runtime_field_leaves_every_key_alone(demo, tmp_path):
    base = _keys(demo, tmp_path)
    paths = list(_runtime_paths(demo))
    # the rule covers what the issue names: workers, threads, loader and upload settings, logging
    names = {p for p, _ in paths}
    assert {"ingest.num_workers", "ingest.max_bad_fraction", "pretrain.num_workers", "pretrain.log_every",
            "pretrain.stream.num_workers", "pretrain.stream.pin_memory", "pretrain.stream.prefetch_factor",
            "pretrain.checkpoint_upload", "fewshot.threads", "finetune.eval_batch_size"} <= names
    for path, value in paths:
        assert _keys(apply_overrides(demo, [f"{path}={value}"]), tmp_path) == base, path


@pytest.mark.parametrize("override,changed", [
    ("ingest.shard_max_samples=1000", {"ingest", "dedup", "pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("data.dedup_max_distance=2", {"dedup", "pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("pretrain.lr=3e-4", {"pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("pretrain.stream.shuffle_buffer=100", {"pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("pretrain.augreg=medium1", {"pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("model.depth=4", {"pretrain", "fewshot", "finetune", "analysis", "report"}),
    ("fewshot.probe.l2_reg=10", {"fewshot", "analysis", "report"}),
    ("finetune.lr_grid=0.003", {"finetune", "analysis", "report"}),
    ("analysis.num_images=8", {"analysis", "report"}),
])
def test_result_fields_change_their_stage_and_downstream(demo, tmp_path, override, changed):
    base = _keys(demo, tmp_path)
    new = _keys(apply_overrides(demo, [override]), tmp_path)
    assert {s for s in base if base[s] != new[s]} == changed
