"""Experiment tracking through a narrow interface: :class:`MlflowTracker` and :class:`NullTracker`.

The tracker never relies on MLflow's process-global "active run": every call names its run id, so the same tracker
can be re-attached inside a Ray worker (``MlflowTracker.attach(uri, run_id)``) and only rank 0 needs to hold one.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

# Keys whose values must never reach a tracking server or a printed config.
_SECRET = re.compile(r"(secret|password|passwd|credential|access_key|api_key|private_key|"
                     r"(^|\.)((auth|access|api|bearer|session|refresh)_)?token$)", re.I)
_URL_CREDS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@\s]+):(?P<pw>[^@/\s]+)@", re.I)
REDACTED = "***"


def redact(key: str, value: Any) -> Any:
    """Hide secrets: values of secret-looking keys, and passwords embedded in URLs."""
    if _SECRET.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        return _URL_CREDS.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
    return value


def redact_tree(d: object, key: str = "") -> object:
    """A copy of a nested config dict with secrets redacted (for printing)."""
    if isinstance(d, dict):
        return {k: redact_tree(v, k) for k, v in d.items()}
    if isinstance(d, list):
        return [redact_tree(v, key) for v in d]
    return redact(key, d)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value}, with secrets redacted."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = redact(key, v)
    return out


class Tracker(Protocol):
    run_id: str | None

    def child(self, name: str, tags: dict[str, str] | None = None) -> "Tracker": ...
    def params(self, d: dict) -> None: ...
    def metrics(self, d: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def tags(self, d: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Tracks nothing (non-zero ranks, tests, --no-tracking)."""

    run_id: str | None = None
    ui_hint = ""

    def child(self, name: str, tags: dict[str, str] | None = None) -> "NullTracker":
        return self

    def params(self, d: dict) -> None: ...
    def metrics(self, d: dict[str, float], step: int | None = None) -> None: ...
    def artifact(self, local_path: str, artifact_path: str | None = None) -> None: ...
    def tags(self, d: dict[str, str]) -> None: ...
    def finish(self, status: str = "FINISHED") -> None: ...


def default_tracking_uri(store_root: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else a sqlite file next to a local store (no server to start)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = store_root if "://" not in store_root or store_root.startswith("file://") else os.path.abspath("runs")
    root = root.removeprefix("file://")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(os.path.abspath(root), 'mlflow.db')}"


class MlflowTracker:
    """One MLflow run; ``child`` opens a nested run (tag ``mlflow.parentRunId``)."""

    def __init__(self, uri: str, run_id: str, experiment_id: str):
        from mlflow.tracking import MlflowClient

        self.uri, self.run_id, self.experiment_id = uri, run_id, experiment_id
        self.client = MlflowClient(tracking_uri=uri)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str] | None = None,
              artifact_location: str | None = None) -> "MlflowTracker":
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location)
        run = client.create_run(exp_id, run_name=run_name, tags=tags or {})
        return cls(uri, run.info.run_id, exp_id)

    @classmethod
    def attach(cls, uri: str, run_id: str) -> "MlflowTracker":
        """Re-open an existing run (e.g. from rank 0 of a Ray Train worker group)."""
        from mlflow.tracking import MlflowClient

        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        return cls(uri, run_id, run.info.experiment_id)

    def child(self, name: str, tags: dict[str, str] | None = None) -> "MlflowTracker":
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"mlflow.parentRunId": self.run_id, **(tags or {})})
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

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    @property
    def ui_hint(self) -> str:
        if self.uri.startswith("sqlite:"):
            return f"mlflow ui --backend-store-uri {self.uri}"
        return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
