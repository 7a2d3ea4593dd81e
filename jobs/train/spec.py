"""What the training stages hand their Ray Train workers: typed specs, serialised explicitly (``to_dict`` /
``from_dict``) because ``train_loop_config`` crosses process boundaries as plain data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vitpipe.jobs.core.configtools import from_dict, to_dict
from vitpipe.jobs.train.config import FinetuneConfig, PretrainConfig
from vitpipe.models import ViTConfig
from vitpipe.pipeline import SourceSpec


@dataclass(frozen=True, kw_only=True)
class TrackerRef:
    """Enough to re-open a stage's MLflow run inside a worker (only rank 0 does)."""

    uri: str
    run_id: str

    @classmethod
    def of(cls, tracker: Any) -> TrackerRef | None:
        """The reference of ``tracker``, or None for a tracker that records nothing."""
        return cls(uri=tracker.uri, run_id=tracker.run_id) if tracker.uri and tracker.run_id else None

    def attach(self) -> Any:
        from vitpipe.jobs.core.tracking import MlflowTracker

        return MlflowTracker.attach(self.uri, self.run_id)


def _tracking(d: dict | None) -> TrackerRef | None:
    return TrackerRef(**d) if d else None


@dataclass(frozen=True, kw_only=True)
class PretrainSpec:
    """One pretraining run as its workers see it."""

    model: ViTConfig
    pretrain: PretrainConfig
    manifest_url: str
    out_url: str
    """The stage folder: ``model.pt``/``model.json`` go here."""
    exclude_url: str | None = None
    """Exclusion list from the dedup stage (near-duplicates of evaluation images), applied by the stream."""
    sources: tuple[SourceSpec, ...] = ()
    """A weighted mix to stream instead of ``manifest_url`` alone (urls resolved, exclusions per source)."""
    tracking: TrackerRef | None = None

    def to_dict(self) -> dict:
        return {"model": self.model.to_dict(), "pretrain": to_dict(self.pretrain), "manifest_url": self.manifest_url,
                "out_url": self.out_url, "exclude_url": self.exclude_url, "sources": to_dict(self.sources),
                "tracking": to_dict(self.tracking) if self.tracking else None}

    @classmethod
    def from_dict(cls, d: dict) -> PretrainSpec:
        return cls(model=ViTConfig.from_dict(d["model"]), pretrain=from_dict(PretrainConfig, d["pretrain"]),
                   manifest_url=d["manifest_url"], out_url=d["out_url"], exclude_url=d.get("exclude_url"),
                   sources=tuple(SourceSpec(**s) for s in d.get("sources", ())),
                   tracking=_tracking(d.get("tracking")))


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    """One fine-tuning run (LR grid + final run) as its workers see it."""

    finetune: FinetuneConfig
    pretrain_url: str
    """The pretrain stage folder whose ``model.pt``/``model.json`` are fine-tuned."""
    out_url: str
    tracking: TrackerRef | None = None

    def to_dict(self) -> dict:
        return {"finetune": to_dict(self.finetune), "pretrain_url": self.pretrain_url, "out_url": self.out_url,
                "tracking": to_dict(self.tracking) if self.tracking else None}

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneSpec:
        return cls(finetune=from_dict(FinetuneConfig, d["finetune"]), pretrain_url=d["pretrain_url"],
                   out_url=d["out_url"], tracking=_tracking(d.get("tracking")))
