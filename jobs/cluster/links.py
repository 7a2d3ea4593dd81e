"""The MLflow side of a cluster job: closing its runs after a stop, and the link a person follows to review it."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from vitpipe.jobs.core.tracking import redact, run_page_url


def close_mlflow_runs(uri: str, parent_id: str, status: str) -> int:
    """End the parent and any child still RUNNING with ``status``; returns how many runs were closed."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_id)
    kids = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    closed = 0
    for r in [parent, *kids]:
        if r.info.status in ("RUNNING", "SCHEDULED"):
            client.set_terminated(r.info.run_id, status=status)
            closed += 1
    return closed


# --------------------------------------------------------------------------------------------------- links
def mlflow_link(tracking_uri: str | None, mlflow_run_id: str | None) -> str:
    """A URL (or command) that opens the MLflow run; credentials never included."""
    if not mlflow_run_id:
        return ""
    if not tracking_uri:
        return f"run {mlflow_run_id} (sqlite in the store: mlflow ui --backend-store-uri sqlite:///<store>/mlflow.db)"
    uri = redact("uri", tracking_uri)
    if not uri.startswith("http"):
        return f"mlflow ui --backend-store-uri {uri}  (run {mlflow_run_id})"
    exp = _experiment_of(tracking_uri, mlflow_run_id)
    base = _without_credentials(uri)
    return run_page_url(base, exp, mlflow_run_id) if exp else f"{base} (run {mlflow_run_id})"


def _without_credentials(uri: str) -> str:
    p = urlparse(uri)
    return p._replace(netloc=p.hostname + (f":{p.port}" if p.port else "")).geturl().rstrip("/")


def _experiment_of(uri: str, run_id: str) -> str | None:
    """The run's experiment id, asked once and briefly: MLflow's default is 7 retries with backoff (minutes)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
    try:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link without the experiment is still useful when the server is away
        return None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
