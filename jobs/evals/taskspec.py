"""Downstream tasks named in configs.

Spec grammar: ``<name>[@<resolution>][=<where>]`` where ``<where>`` is an image folder (any fsspec URL;
``<folder>/{train,test}/<class>/``, or only ``train/``, or only class folders: then a stratified test split is held
out and recorded) or an ingested shard set ``shards:<train manifest>[,<test manifest>]``; ``digits`` needs no
``<where>``. ``@<resolution>`` asks for probing at that input size (``hymenoptera@64=../shared/data/hymenoptera``):
the model's position embeddings are interpolated to it (:func:`model_at_resolution`). Existing specs
(``cifar10=../data/cifar10``, ``digits``) keep their meaning.

A task's metric label is its name, plus ``_<res>px`` with a resolution (``hymenoptera_64px``): MLflow metric names
allow no ``@`` or ``=``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["TaskSpec", "make_task", "model_at_resolution", "parse_task", "parse_task_spec"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class TaskSpec:
    """One parsed task spec."""

    name: str
    """The user's task name (letters, digits, ``_ . -``)."""
    where: str | None
    """Folder URL or ``shards:<train>[,<test>]``; None for built-in tasks (``digits``)."""
    resolution: int | None = None
    """Probe input size from ``@<resolution>``; None: the model's own resolution."""

    @property
    def label(self) -> str:
        """Metric-safe task label: ``name``, or ``name_<res>px`` with a resolution."""
        return self.name if self.resolution is None else f"{self.name}_{self.resolution}px"


def parse_task_spec(spec: str | TaskSpec) -> TaskSpec:
    """``"hymenoptera@64=../data/hymenoptera"`` -> TaskSpec("hymenoptera", "../data/hymenoptera", 64)."""
    if isinstance(spec, TaskSpec):
        return spec
    head, sep, where = str(spec).partition("=")
    name, at, res = head.partition("@")
    if not _NAME.fullmatch(name):
        raise ValueError(f"bad task spec '{spec}': the name must be letters, digits, '_', '.' or '-' "
                         "(name[@resolution]=<folder>, or digits)")
    resolution = None
    if at:
        if not res.isdigit() or int(res) < 1:
            raise ValueError(f"bad task spec '{spec}': '@{res}' must be a positive integer resolution")
        resolution = int(res)
    if sep and not where:
        raise ValueError(f"bad task spec '{spec}': nothing after '='")
    return TaskSpec(name=name, where=where if sep else None, resolution=resolution)


def parse_task(spec: str) -> tuple[str, str | None]:
    """``"cifar10=../data/cifar10"`` -> ("cifar10", path); ``"digits"`` -> ("digits", None);
    ``"hymenoptera@64=p"`` -> ("hymenoptera_64px", p): the first item is the metric label."""
    s = parse_task_spec(spec)
    return s.label, s.where


def make_task(spec: str | TaskSpec, *, test_fraction: float | None = None, split_seed: int = 0) -> Any:
    """Build the pipeline task object for ``spec`` (a clear one-line error for a missing folder).

    The task's ``name`` is the spec's label and its ``resolution`` the spec's ``@<resolution>``. A folder or shard
    set without a test split holds one out (``test_fraction`` of each class, default
    ``vitpipe.pipeline.tasks.DEFAULT_TEST_FRACTION``; ``split_seed``), recorded in ``task.split_info()``.
    """
    from vitpipe.pipeline.tasks import DEFAULT_TEST_FRACTION, DigitsTask, ImageFolderTask, ShardSetTask

    s = parse_task_spec(spec)
    carve = {"test_fraction": DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction,
             "split_seed": split_seed}
    if s.where is not None and s.where.startswith("shards:"):
        train, sep, test = s.where.removeprefix("shards:").partition(",")
        if not train or (sep and not test):
            raise ValueError(f"task '{spec}': expected {s.name}=shards:<train manifest>[,<test manifest>]")
        task = ShardSetTask(train, test or None, name=s.label, **carve)
    elif s.where is None:
        if s.name != "digits":
            raise ValueError(f"unknown task '{spec}': built-in tasks are 'digits'; others are name=<image folder>")
        # Upsample the 8x8 digits straight to the asked-for size (one resampling instead of two).
        task = DigitsTask() if s.resolution is None else DigitsTask(size=s.resolution)
        task.name = s.label
    else:
        if "://" not in s.where and not os.path.isdir(s.where):
            raise FileNotFoundError(f"task '{s.name}': no such folder '{s.where}' "
                                    "(expected <folder>/{train,test}/<class>/ or <folder>/<class>/)")
        task = ImageFolderTask(s.where, name=s.label, **carve)
    task.resolution = s.resolution
    return task


def model_at_resolution(model: Any, cfg: Any, img_size: int | tuple[int, int]) -> Any:
    """``model`` (a vitpipe ViT built from ``cfg``) at input size ``img_size``: a new model with the same weights,
    its patch-grid position embeddings resized bilinearly with aligned corners (paper §3.2, via
    ``vitpipe.models.load_pretrained``); ``model`` itself when the size is unchanged. Same device and dtype,
    eval mode."""
    from vitpipe.models import create, load_pretrained

    new_cfg = cfg.replace(img_size=img_size)
    if new_cfg.img_hw == cfg.img_hw:
        return model
    new = create(new_cfg)
    info = load_pretrained(new, model.state_dict(), cfg, drop_head=False)
    if info["missing"] or info["unexpected"] or info["dropped"]:
        raise RuntimeError(f"resizing the model to {img_size} lost weights: {info}")
    ref = next(model.parameters())
    return new.to(device=ref.device, dtype=ref.dtype).eval()
