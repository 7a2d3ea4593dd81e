"""vitpipe: ViT pretraining and evaluation pipeline (models, pipeline, jobs)."""

__version__ = "0.1.0"
