"""The run store: stage outputs and run records on any fsspec URL.

Layout (architecture.md "One run, as data")::

    <store>/stages/<stage>/<key>/result.json   # written last and atomically: present means done
    <store>/stages/<stage>/<key>/...           # the stage's files (shards, checkpoints, model.pt, figures)
    <store>/runs/<run_id>/run.json             # resolved config + the key of each stage
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from vitpipe.pipeline.fsio import join_url, write_atomic


def normalise_url(url: str) -> str:
    """Plain local paths become absolute (Ray workers and jobs run in other working directories)."""
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))




def local_path(url: str) -> str | None:
    """The local filesystem path behind ``url``, or None for remote storage."""
    fs, path = url_to_fs(url)
    return path if "file" in _protocols(fs) else None


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        return json.load(f)


def write_json_atomic(url: str, data: Any) -> None:
    """Write JSON to ``url`` atomically (``vitpipe.pipeline.fsio``): readers never see half a file."""
    fs, path = url_to_fs(url)
    fs.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomic(fs, path, json.dumps(data, indent=2, sort_keys=True, default=str).encode())


def makedirs(url: str) -> None:
    fs, path = url_to_fs(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    fs, path = url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@dataclass(kw_only=True)
class StageResult:
    """What a finished stage leaves behind: its metrics, its files (relative to the stage folder), its timings."""

    stage: str
    key: str
    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    mlflow_run_id: str | None = None
    url: str = ""  # the stage folder; filled in when loaded

    def path(self, name: str) -> str:
        """URL of one of this stage's artifacts."""
        return join_url(self.url, self.artifacts[name])

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("url")
        return d

    @classmethod
    def from_dict(cls, d: dict, url: str = "") -> "StageResult":
        return cls(**d, url=url)


class Store:
    """Stage folders and run records under one fsspec root."""

    def __init__(self, root: str):
        self.root = normalise_url(root)

    def stage_url(self, stage: str, key: str) -> str:
        return join_url(self.root, "stages", stage, key)

    def result_url(self, stage: str, key: str) -> str:
        return join_url(self.stage_url(stage, key), "result.json")

    def load_result(self, stage: str, key: str) -> StageResult | None:
        url = self.result_url(stage, key)
        if not exists(url):
            return None
        return StageResult.from_dict(read_json(url), url=self.stage_url(stage, key))

    def save_result(self, result: StageResult) -> None:
        write_json_atomic(self.result_url(result.stage, result.key), result.to_dict())
        result.url = self.stage_url(result.stage, result.key)

    def run_url(self, run_id: str) -> str:
        return join_url(self.root, "runs", run_id, "run.json")

    def save_run(self, run_id: str, record: dict) -> None:
        write_json_atomic(self.run_url(run_id), record)

    def load_run(self, run_id: str) -> dict:
        url = self.run_url(run_id)
        if not exists(url):
            raise FileNotFoundError(f"no run '{run_id}' in store {self.root} (see: vitpipe runs --store {self.root})")
        return read_json(url)

    def list_runs(self) -> list[dict]:
        fs, path = url_to_fs(join_url(self.root, "runs"))
        if not fs.exists(path):
            return []
        records = []
        for entry in sorted(fs.ls(path, detail=False)):
            run_json = join_url(self.root, "runs", entry.rstrip("/").rsplit("/", 1)[-1], "run.json")
            if exists(run_json):
                records.append(read_json(run_json))
        return sorted(records, key=lambda r: r.get("started", ""))
