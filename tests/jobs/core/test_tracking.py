"""The tracker against a real MLflow store (sqlite): the experiment's kind, dataset inputs, MLflow's system-metrics
sampling on a run we name (never MLflow's active run), and the two trackers keeping one interface."""

from __future__ import annotations

import inspect
import json
import threading
import time

import pytest

from vitpipe.jobs.core.tracking import (EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker, NullTracker, Tracker,
                                   run_page_url)


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"  # one store: creating one costs seconds


def test_both_trackers_have_every_tracker_method_with_its_parameters():
    methods = [n for n, f in vars(Tracker).items() if inspect.isfunction(f) and not n.startswith("_")]
    assert {"dataset", "system_metrics", "metrics", "finish"} <= set(methods)
    for impl in (MlflowTracker, NullTracker):
        for name in methods:
            want = inspect.signature(getattr(Tracker, name)).parameters
            assert inspect.signature(getattr(impl, name)).parameters == want, f"{impl.__name__}.{name}"
    assert {"run_id", "uri", "ui_hint"} <= set(Tracker.__annotations__)


def test_experiment_opens_in_the_model_training_view(uri, tmp_path):
    t = MlflowTracker.start(uri, "kind-new", "r", artifact_location=str(tmp_path))
    assert t.run_id and t.uri == uri
    assert t.client.get_experiment(t.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert EXPERIMENT_KIND == "custom_model_development"  # the value MLflow's UI calls "Machine learning"

    # an experiment made without the tag gets it; one whose kind a person chose keeps that
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    old = client.create_experiment("kind-old", artifact_location=str(tmp_path))
    chosen = client.create_experiment("kind-chosen", artifact_location=str(tmp_path),
                                      tags={EXPERIMENT_KIND_TAG: "genai_development"})
    MlflowTracker.start(uri, "kind-old", "r")
    MlflowTracker.start(uri, "kind-chosen", "r")
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"

    page = f"http://h:5000/#/experiments/{t.experiment_id}/runs/{t.run_id}?workflowType=machine_learning"
    assert run_page_url("http://h:5000/", t.experiment_id, t.run_id) == page
    assert t.ui_hint.startswith(f"mlflow ui --backend-store-uri {uri}  then  http://127.0.0.1:5000/#/experiments/")
    assert t.ui_hint.endswith(f"/runs/{t.run_id}?workflowType=machine_learning")


def test_dataset_inputs_carry_source_digest_profile_and_context(uri, tmp_path):
    t = MlflowTracker.start(uri, "datasets", "r", artifact_location=str(tmp_path))
    manifest = str(tmp_path / "shards" / "manifest.json")
    t.dataset(name="cifar10-train", source=manifest, digest="0123456789", profile={"num_samples": 500})
    t.dataset(name="extra", source="s3://user:pw@bucket/extra/manifest.json", digest="abcdefabcd",
              context="evaluation")
    t.dataset(name="mem", source="memory://bucket/m.json", digest="ffffffffff")  # no MLflow source for memory://
    got = {d.dataset.name: d for d in t.client.get_run(t.run_id).inputs.dataset_inputs}
    assert set(got) == {"cifar10-train", "extra", "mem"}
    ds = got["cifar10-train"].dataset
    assert (ds.digest, ds.source_type, json.loads(ds.source), json.loads(ds.profile)) == \
        ("0123456789", "local", {"uri": manifest}, {"num_samples": 500})
    assert {(tag.key, tag.value) for tag in got["cifar10-train"].tags} == {("mlflow.data.context", "training")}
    extra = got["extra"]
    assert (extra.dataset.source_type, json.loads(extra.dataset.source)) == \
        ("s3", {"uri": "s3://user:***@bucket/extra/manifest.json"})  # a URL's password never reaches MLflow
    assert {(tag.key, tag.value) for tag in extra.tags} == {("mlflow.data.context", "evaluation")}
    assert extra.dataset.profile is None
    mem = got["mem"].dataset
    assert (mem.source_type, json.loads(mem.source)) == ("memory", {"uri": "memory://bucket/m.json"})


def _monitor_threads() -> list[threading.Thread]:
    return [th for th in threading.enumerate() if th.name == "SystemMetricsMonitor"]


def test_system_metrics_sample_into_the_named_run_and_stop_with_the_block(uri, tmp_path):
    import mlflow

    t = MlflowTracker.start(uri, "sysmetrics", "r", artifact_location=str(tmp_path))
    with t.system_metrics(interval_s=0.2):
        assert len(_monitor_threads()) == 1
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not t.client.get_run(t.run_id).data.metrics:
            time.sleep(0.2)  # until the sampler's first batch reached the store (a loaded machine is slow)
    assert _monitor_threads() == []  # the sampler stops when the block ends
    first = t.client.get_metric_history(t.run_id, "system/cpu_utilization_percentage")
    assert first and {"system/system_memory_usage_megabytes", "system/system_memory_usage_percentage"} <= \
        set(t.client.get_run(t.run_id).data.metrics)
    assert mlflow.active_run() is None  # never MLflow's process-global run

    # A second sampler on the same run (a restarted worker group) continues after the steps already logged.
    with t.system_metrics(interval_s=0.2):
        deadline = time.monotonic() + 60
        while (time.monotonic() < deadline and
               len(t.client.get_metric_history(t.run_id, "system/cpu_utilization_percentage")) == len(first)):
            time.sleep(0.2)
    steps = [m.step for m in t.client.get_metric_history(t.run_id, "system/cpu_utilization_percentage")]
    assert len(steps) > len(first) and len(set(steps)) == len(steps)  # no step logged twice


def test_null_tracker_records_nothing_and_its_sampler_is_a_no_op():
    t = NullTracker()
    with t.system_metrics(interval_s=0.01):
        assert _monitor_threads() == []
    t.dataset(name="x", source="/nowhere", digest="0")
    assert t.child("c") is t and t.run_id is None and t.uri is None
