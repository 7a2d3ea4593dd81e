"""Downstream tasks named in configs: ``name=<image folder with train/test>``, ``digits``, or an ingested shard
set ``name=shards:<train manifest URL>,<test manifest URL>``."""

from __future__ import annotations

import os
from typing import Any


def parse_task(spec: str) -> tuple[str, str | None]:
    """``"cifar10=../data/cifar10"`` -> ("cifar10", path); ``"digits"`` -> ("digits", None)."""
    name, sep, where = spec.partition("=")
    if not name:
        raise ValueError(f"bad task spec '{spec}': expected name=<folder> or digits")
    return name, (where or None) if sep else None


def make_task(spec: str) -> Any:
    """Build the pipeline task object for ``spec`` (a clear one-line error for a missing folder)."""
    from vitpipe.pipeline import DigitsTask, ImageFolderTask, ShardSetTask

    name, where = parse_task(spec)
    if where is not None and where.startswith("shards:"):
        train, sep, test = where.removeprefix("shards:").partition(",")
        if not sep:
            raise ValueError(f"task '{spec}': expected {name}=shards:<train manifest>,<test manifest>")
        return ShardSetTask(train, test, name=name)
    if where is None:
        if name == "digits":
            return DigitsTask()
        raise ValueError(f"unknown task '{spec}': built-in tasks are 'digits'; others are name=<image folder>")
    if "://" not in where and not os.path.isdir(where):
        raise FileNotFoundError(f"task '{name}': no such folder '{where}' (expected <folder>/{{train,test}}/<class>/)")
    task = ImageFolderTask(where)
    task.name = name
    return task
