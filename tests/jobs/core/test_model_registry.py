"""Registering a pretrain stage's model.pt/model.json: logged as code, quietly, and it classifies both input kinds."""

from __future__ import annotations

import json
import runpy
import warnings

import numpy as np
import pytest
import torch

from vitpipe.jobs.core import model_registry
from vitpipe.jobs.core.model_registry import register_model
from vitpipe.jobs.core.tracking import MlflowTracker
from vitpipe.models import ViTConfig, create

pytestmark = pytest.mark.slow  # an MLflow model log + registration: ~10 s


def test_registered_model_logs_without_warnings_and_predicts_uint8_and_float(tmp_path):
    import mlflow.pyfunc

    cfg = ViTConfig(img_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64, num_classes=3)
    torch.manual_seed(0)
    model = create(cfg).eval()
    torch.nn.init.normal_(model.head.weight)  # the zero-initialised head would predict uniform for any input
    stage = tmp_path / "pretrain"
    stage.mkdir()
    torch.save(model.state_dict(), stage / "model.pt")
    (stage / "model.json").write_text(json.dumps({"config": cfg.to_dict()}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker.start(uri, "vitpipe", "reg", artifact_location=str(tmp_path / "art"))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # MLflow checks predict's type hints where the class is defined: define it once more, then log it
        runpy.run_path(model_registry.__file__)
        model_uri = register_model(uri, tracker.run_id, str(stage), "vitpipe-test", classes=["a", "b", "c"])
    assert model_uri == "models:/vitpipe-test/1"
    assert not [w for w in caught if "type hint" in str(w.message).lower()], [str(w.message) for w in caught]

    mlflow.set_tracking_uri(uri)
    clf = mlflow.pyfunc.load_model(model_uri)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = torch.as_tensor((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.inference_mode():
        ref = model(x).softmax(-1).numpy()
    np.testing.assert_allclose(clf.predict(pixels), ref, rtol=1e-5, atol=1e-6)  # uint8 HWC pixels
    np.testing.assert_allclose(clf.predict(x.numpy()), ref, rtol=1e-5, atol=1e-6)  # normalised CHW floats
