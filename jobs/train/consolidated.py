"""The one way to build a model from a pretrain stage's consolidated export (``model.pt`` + ``model.json``): for
feature extraction and analysis as trained, at another resolution (position embeddings interpolated), or with a
fresh zero-initialised head for fine-tuning (paper §3.2)."""

from __future__ import annotations

import dataclasses

import torch

from vitpipe.jobs.train.checkpoint import load_consolidated
from vitpipe.models import ViTConfig, create, load_pretrained


def build_model(sd: dict[str, torch.Tensor], meta: dict, *, img_size: int | None = None,
                num_classes: int | None = None, dropout: float | None = None) -> tuple[torch.nn.Module, ViTConfig]:
    """The exported ViT (``meta`` is ``model.json``) in eval mode.

    ``img_size``: another resolution (the grid of position embeddings is resized, class token kept).
    ``num_classes``: a new classifier with zero kernel and bias, pre-logits dropped (fine-tuning); the pretrained
    head is not loaded. ``dropout`` overrides the config's dropout (fine-tuning runs without it).
    """
    src = ViTConfig.from_dict(meta["config"])
    changes: dict = {}
    if img_size is not None:
        changes["img_size"] = img_size
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if dropout is not None:
        changes["dropout"] = dropout
    if not changes:
        model = create(src)
        model.load_state_dict(sd)
        return model.eval(), src
    model = create(dataclasses.replace(src, **changes))
    load_pretrained(model, sd, src, drop_head=num_classes is not None)
    if num_classes is not None:
        model.reset_classifier(num_classes, drop_pre_logits=True)
    return model.eval(), model.cfg


def load_model(pretrain_url: str, **kwargs) -> tuple[torch.nn.Module, ViTConfig]:
    """:func:`build_model` from the export under a pretrain stage folder (loaded with ``weights_only=True``)."""
    sd, meta = load_consolidated(pretrain_url)
    return build_model(sd, meta, **kwargs)
