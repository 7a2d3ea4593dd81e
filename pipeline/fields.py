"""The one convention every typed config in vitpipe follows for cache keys: fields that change how a result is
computed or observed, never the result itself (worker counts, threads, loader and upload settings, logging), are
declared with :func:`runtime_field`; everything else is part of the result's identity.

``vitpipe.jobs`` derives each stage's cache key from its config sections minus these fields, and
``IngestConfig.output_fingerprint`` (what decides whether an existing shard may be reused) uses the same marks.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RESULT_META = "vitpipe.affects_result"


def runtime_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that does not change the result (left out of cache keys and output fingerprints)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RESULT_META: False})


def affects_result(f: dataclasses.Field) -> bool:
    """False for fields declared with :func:`runtime_field`."""
    return f.metadata.get(RESULT_META, True)


def result_dict(obj: Any) -> Any:
    """``asdict``-like JSON tree of a config with every runtime field left out, recursively (tuples -> lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: result_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if affects_result(f)}
    if isinstance(obj, (list, tuple)):
        return [result_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): result_dict(v) for k, v in obj.items()}
    return obj
