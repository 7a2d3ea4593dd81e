"""The pretrained model in the MLflow model registry, loadable with ``mlflow.pyfunc.load_model`` for inference."""

from __future__ import annotations

import contextlib

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

try:
    import mlflow.pyfunc

    _Base = mlflow.pyfunc.PythonModel
except ImportError:  # pragma: no cover
    _Base = object

# What log_model records instead of a cloudpickle of the class: a script that builds the model from installed code.
ENTRY_SCRIPT = Path(__file__).with_name("pyfunc_entry.py")


class ViTClassifier(_Base):
    """pyfunc wrapper: a batch of images -> class probabilities.

    Input: float array (B, 3, H, W) already normalised, or uint8 (B, H, W, 3) pixels (normalised here with the
    pipeline's mean/std 0.5). Output: (B, num_classes) softmax probabilities (or pre-logits for a headless model).
    """

    def load_context(self, context: Any) -> None:
        import torch

        from vitpipe.models import ViTConfig, create

        with open(context.artifacts["config"]) as f:
            meta = json.load(f)
        self.model = create(ViTConfig.from_dict(meta["config"])).eval()
        self.model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        self.classes = meta.get("classes")

    # np.ndarray is a hint MLflow accepts without inferring a schema (no single one covers both input kinds), so
    # logging the model neither validates the input nor warns "Add type hints to the `predict` method".
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> np.ndarray:
        import torch

        x = np.asarray(model_input)
        if x.dtype == np.uint8:
            x = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
            x = x.transpose(0, 3, 1, 2) if x.shape[-1] == 3 else x
        with torch.inference_mode():
            out = self.model(torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32))
        if self.model.cfg.num_classes:
            out = out.softmax(-1)
        return out.numpy()


def register_model(tracking_uri: str, run_id: str, pretrain_url: str, name: str,
                   classes: list[str] | None = None) -> str:
    """Log ``model.pt`` + ``model.json`` of a pretrain stage as a pyfunc model in ``run_id`` and register it as
    ``name``; returns the ``models:/name/version`` URI."""
    import fsspec
    import mlflow

    from vitpipe import __version__

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, fname in (("weights", "model.pt"), ("config", "model.json")):
            local = os.path.join(tmp, fname)
            with fsspec.open(f"{pretrain_url}/{fname}", "rb") as src, open(local, "wb") as dst:
                dst.write(src.read())
            files[key] = local
        if classes is not None:
            meta = json.loads(Path(files["config"]).read_text())
            meta["classes"] = classes
            Path(files["config"]).write_text(json.dumps(meta))
        with _fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=str(ENTRY_SCRIPT), artifacts=files, registered_model_name=name,
                pip_requirements=[f"vitpipe=={__version__}"], await_registration_for=30)
    return f"models:/{name}/{info.registered_model_version}"


@contextlib.contextmanager
def _fluent_tracking_uri(uri: str):
    """MLflow's fluent API on ``uri`` for the duration only. ``mlflow.set_tracking_uri`` also exports
    ``MLFLOW_TRACKING_URI``, which every later run in this process and every process it starts (a Ray head, a
    sweep's next point) would otherwise inherit and track to."""
    from mlflow.tracking._tracking_service import utils

    prev_uri, prev_env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev_uri)  # None also unsets the variable
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env
