"""What every stage is: the ``Stage`` protocol, the ``StageContext`` a running stage gets, and the cache-key rule.

A stage's key is a hash of (its name, its version, the result view of the config sections it ``reads``, the keys of
its inputs). The result view drops every ``runtime_field`` (workers, threads, loader and upload settings, logging),
so changing those reuses the cache and changing anything else does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vitpipe.jobs.core.configtools import config_hash, result_dict
from vitpipe.jobs.core.store import StageResult, Store
from vitpipe.jobs.train.progress import NULL_PROGRESS, StageProgress
from vitpipe.jobs.core.tracking import Tracker

if TYPE_CHECKING:  # the pipeline config imports the stage configs: a runtime import would be a circle
    from vitpipe.jobs.config import PipelineConfig


@dataclass
class StageContext:
    """Everything a running stage may use: where to write, what its inputs produced, how to report."""

    key: str
    url: str
    """This stage's output folder (fsspec URL)."""
    store: Store
    inputs: dict[str, StageResult]
    tracker: Tracker
    run_id: str
    report: StageProgress = NULL_PROGRESS
    """This stage's progress bar in the run's view (the null one when the run shows none or the stage runs in
    another process: a bar never leaves the driver)."""


class Stage(Protocol):
    name: str
    version: str
    """Bump when the stage's code changes what it writes."""

    def inputs(self, cfg: PipelineConfig) -> list[str]: ...

    def reads(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The config sections (dataclasses or plain values) this stage's result depends on."""
        ...

    def resources(self, cfg: PipelineConfig) -> dict[str, float] | None:
        """What the stage asks of Ray when it runs beside others (a concurrent run: ``run.scheduler``), e.g.
        ``{"CPU": 2}``; None: it runs on the driver (it launches its own Ray work, or must be alone)."""
        ...

    def run(self, cfg: PipelineConfig, ctx: StageContext) -> StageResult: ...


def stage_key(stage: Stage, cfg: PipelineConfig, input_keys: list[str]) -> str:
    """The cache key rule, the same for every stage."""
    return config_hash({"stage": stage.name, "version": stage.version, "config": result_dict(stage.reads(cfg)),
                        "inputs": input_keys})
