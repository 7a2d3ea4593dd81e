"""A run's config resolved once: the typed tree, its JSON form and its redacted JSON form.

Everything that leaves the process (``run.json``, MLflow params, ``config.json``, ``--dry-run`` and summaries)
reads the redacted form made here, once per run; stages read the typed tree; cache keys hash result views of
the typed sections (``vitpipe.jobs.stages.base.stage_key``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from vitpipe.jobs.core.configtools import to_dict
from vitpipe.jobs.core.secrets import flatten, redact_tree


@dataclass(frozen=True)
class ResolvedConfig:
    """``cfg`` plus its serialised (``tree``) and redacted (``public``) forms, computed once."""

    cfg: Any
    """The typed config (a ``PipelineConfig``; any dataclass tree for toy pipelines in tests)."""
    tree: dict
    """``to_dict(cfg)``: JSON-safe, secrets included (stays in this process)."""
    public: dict
    """``tree`` with secrets redacted: the only form that is written, logged or printed."""

    @classmethod
    def of(cls, cfg: Any) -> ResolvedConfig:
        if isinstance(cfg, ResolvedConfig):
            return cfg
        tree = to_dict(cfg)
        return cls(cfg=cfg, tree=tree, public=redact_tree(tree))

    def json(self) -> str:
        """The redacted config as indented JSON (``config.json``, ``--dry-run``)."""
        return json.dumps(self.public, indent=2)

    def params(self) -> dict[str, Any]:
        """The redacted config flattened to ``{"a.b.c": value}`` (MLflow params)."""
        return flatten(self.public)
