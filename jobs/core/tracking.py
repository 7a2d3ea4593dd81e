"""Experiment tracking through a narrow interface: :class:`MlflowTracker` and :class:`NullTracker`.

The tracker never relies on MLflow's process-global "active run": every call names its run id, so the same tracker
can be re-attached inside a Ray worker (``MlflowTracker.attach(uri, run_id)``) and only rank 0 needs to hold one.

Metric names follow one scheme, so that MLflow's run pages group them into sections by prefix (MLflow makes a
section of everything before a name's last ``/`` and puts ``system/`` names on the "System metrics" tab):
``train/...`` (loss, lr, throughput of a training loop), ``eval/<task>/...`` (evaluation results, e.g.
``eval/cifar10/10shot``), ``train/data/...`` (the input stream), ``system/...`` (MLflow's own CPU/memory/GPU sampling,
our per-rank memory peaks, stage seconds).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import warnings
from typing import Any, ContextManager, Iterator, Protocol

from vitpipe.jobs.core.secrets import REDACTED, flatten, redact, redact_tree  # noqa: F401 (moved there; re-exported)

log = logging.getLogger(__name__)

# The experiment tag MLflow 3.x reads for an experiment's kind; "custom_model_development" is its model-training
# ("Machine learning") view, instead of the GenAI traces overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI takes the view from a global workflow switch (sidebar: GenAI / Model training; default GenAI)
# rather than from that tag; this query parameter of a page URL selects model training.
WORKFLOW_QUERY = "workflowType=machine_learning"
SYSTEM_METRICS_INTERVAL_S = 10.0
"""MLflow's default sampling interval; ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` overrides it."""


class Tracker(Protocol):
    """Where a run's params, metrics, tags and artifacts go. Only rank 0 of a worker group holds one."""

    run_id: str | None
    uri: str | None
    """Tracking URI (None for a tracker that records nothing)."""
    ui_hint: str
    """How a person opens this run (a command or a URL); empty when there is nothing to open."""

    def child(self, name: str, tags: dict[str, str] | None = None) -> "Tracker": ...
    def params(self, d: dict) -> None: ...
    def metrics(self, d: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def text(self, text: str, name: str) -> None: ...
    def tags(self, d: dict[str, str]) -> None: ...

    def dataset(self, *, name: str, source: str, digest: str, profile: dict[str, Any] | None = None,
                context: str = "training") -> None:
        """Record the data this run used as one of its dataset inputs (MLflow's Dataset column): ``source`` is
        its URL, ``digest`` a short content hash, ``profile`` its counts."""
        ...

    def system_metrics(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> ContextManager[None]:
        """Sample this machine's CPU, memory, disk, network (and GPUs, with nvidia-ml-py) into this run as
        ``system/...`` metrics every ``interval_s`` seconds, until the block exits."""
        ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing (non-zero ranks, tests, --no-tracking)."""

    run_id: str | None = None
    uri: str | None = None
    ui_hint = ""

    def child(self, name: str, tags: dict[str, str] | None = None) -> "NullTracker":
        return self

    def params(self, d: dict) -> None: ...
    def metrics(self, d: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def text(self, text: str, name: str) -> None: ...
    def tags(self, d: dict[str, str]) -> None: ...

    def dataset(self, *, name: str, source: str, digest: str, profile: dict[str, Any] | None = None,
                context: str = "training") -> None: ...

    def system_metrics(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> ContextManager[None]:
        return contextlib.nullcontext()

    def finish(self, status: str = "FINISHED") -> None: ...


def default_tracking_uri(store_root: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file next to a local store (no server to start)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = store_root if "://" not in store_root or store_root.startswith("file://") else os.path.abspath("runs")
    root = root.removeprefix("file://")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(os.path.abspath(root), 'mlflow.db')}"


def recorded_tracking_uri(record: dict | None) -> str | None:
    """The tracking URI a run record names, where it is usable (one with credentials is recorded redacted)."""
    uri = (record or {}).get("tracking_uri")
    return uri if uri and "***" not in uri else None


def run_page_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or of one of its runs) at server ``base``, in the model-training view."""
    page = f"{base.rstrip('/')}/#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{page}?{WORKFLOW_QUERY}"


class MlflowTracker:
    """One MLflow run; ``child`` opens a nested run (tag ``mlflow.parentRunId``) carrying ``child_tags``."""

    def __init__(self, uri: str, run_id: str, experiment_id: str, child_tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.child_tags = dict(child_tags or {})
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              artifact_location: str | None = None) -> "MlflowTracker":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_location,
                                              tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        else:
            exp_id = exp.experiment_id
            if EXPERIMENT_KIND_TAG not in exp.tags:  # one made before this tag, or by hand; a kind set by hand stays
                client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
        return cls(uri, run.info.run_id, exp_id)

    @classmethod
    def attach(cls, uri: str, run_id: str, child_tags: dict[str, str] | None = None) -> "MlflowTracker":
        """Re-open an existing run (rank 0 of a Ray Train worker group; another attempt of a pipeline run, whose
        stage runs then carry ``child_tags``)."""
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        return cls(uri, run_id, run.info.experiment_id, child_tags)

    def child(self, name: str, tags: dict[str, str] | None = None) -> "MlflowTracker":
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, **self.child_tags, **(tags or {})})
        return MlflowTracker(self.uri, run.info.run_id, self.experiment_id)

    def params(self, d: dict) -> None:
        from mlflow.entities import Param

        flat = [Param(k, str(v)[:6000]) for k, v in flatten(d).items()]
        for i in range(0, len(flat), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=flat[i:i + 100])

    def metrics(self, d: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = [Metric(k, float(v), ts, step or 0) for k, v in d.items() if v is not None]
        for i in range(0, len(ms), 1000):
            self.client.log_batch(self.run_id, metrics=ms[i:i + 1000])

    def artifact(self, local_path: str, artifact_path: str | None = None) -> None:
        if os.path.isdir(local_path):
            self.client.log_artifacts(self.run_id, local_path, artifact_path)
        else:
            self.client.log_artifact(self.run_id, local_path, artifact_path)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def tags(self, d: dict[str, str]) -> None:
        for k, v in d.items():
            self.client.set_tag(self.run_id, k, str(v))

    def dataset(self, *, name: str, source: str, digest: str, profile: dict[str, Any] | None = None,
                context: str = "training") -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        entity = Dataset(name=name, digest=digest, profile=json.dumps(profile) if profile else None,
                         **_dataset_source(redact("uri", source)))
        self.client.log_inputs(self.run_id, [DatasetInput(entity, [InputTag(MLFLOW_DATASET_CONTEXT, context)])])

    @contextlib.contextmanager
    def system_metrics(self, interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[None]:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # its start/stop/"skip GPU" lines would land in every worker's output: only its warnings pass
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
        # resume_logging: a restarted worker group logs into the same run, after the steps already there
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval_s, resume_logging=True,
                                       tracking_uri=self.uri)
        if shutil.which("nvidia-smi") and not any("GPU" in type(m).__name__ for m in monitor.monitors):
            log.warning("MLflow system metrics: no GPU utilisation/memory (install nvidia-ml-py on the workers)")
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()  # stops the sampling thread and flushes what it batched

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    @property
    def ui_hint(self) -> str:
        if self.uri.startswith("sqlite:"):
            page = run_page_url("http://127.0.0.1:5000", self.experiment_id, self.run_id)
            return f"mlflow ui --backend-store-uri {self.uri}  then  {page}"
        return run_page_url(self.uri, self.experiment_id, self.run_id)


def _dataset_source(url: str) -> dict[str, str]:
    """``source_type`` and ``source`` (JSON) of a dataset at ``url``, as MLflow's own source resolver writes them
    (``local``, ``s3``, ``gs``, ...); a scheme it has no source for keeps its URI under that scheme."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.exceptions import MlflowException

    with warnings.catch_warnings():
        # MLflow registers its local source for both "" and "file://" and then warns that a path matches both.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        try:
            d = MetaDataset(resolve_dataset_source(url)).to_dict()
        except MlflowException:
            return {"source_type": url.partition("://")[0], "source": json.dumps({"uri": url})}
    return {"source_type": d["source_type"], "source": d["source"]}
