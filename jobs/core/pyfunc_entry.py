"""MLflow models-from-code entry for the registered ViT (``registry.register_model``): MLflow stores this script,
not a pickle, and runs it at load time, so the model class comes from the installed vitpipe."""

import mlflow.models

from vitpipe.jobs.core.model_registry import ViTClassifier

mlflow.models.set_model(ViTClassifier())
