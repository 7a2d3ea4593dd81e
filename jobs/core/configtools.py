"""Typed-dataclass config machinery: dotted overrides, (de)serialisation, stable hashing, cache-key views.

Configs are plain ``@dataclass(kw_only=True)`` trees owned by their components (``ViTConfig`` by models,
``IngestConfig``/``StreamConfig`` by pipeline, stage configs by their stage module). This module only knows how to
walk such trees; it knows nothing about ViTs or stages. Fields that never change a result are declared with
``runtime_field`` (``vitpipe.pipeline.fields``, the one convention for every layer) and are left out of
:func:`result_dict`, the view a stage's cache key is hashed from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Union, get_args, get_origin, get_type_hints

from vitpipe.pipeline.fields import result_dict, runtime_field

__all__ = ["ConfigError", "apply_overrides", "config_hash", "from_dict", "parse_override", "result_dict",
           "runtime_field", "to_dict"]


class ConfigError(ValueError):
    """A user-caused configuration problem; the message is one line naming the key."""


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> JSON-safe dict (tuples become lists)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    return cfg


def from_dict(cls: type, data: dict, *, path: str = "") -> Any:
    """Build dataclass ``cls`` from a dict produced by :func:`to_dict` (types restored, unknown keys rejected)."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key '{_join(path, unknown[0])}' (valid: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], _join(path, k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid config at '{path or cls.__name__}': {e}") from None


def config_hash(obj: Any, length: int = 16) -> str:
    """Stable short hash of a config tree (or any JSON-able value)."""
    blob = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def parse_override(text: str) -> tuple[str, str]:
    """``"train.lr=3e-4"`` -> ``("train.lr", "3e-4")``."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override '{text}': expected key=value, e.g. pretrain.lr=3e-4")
    return key.strip(), value.strip()


def apply_overrides(cfg: Any, overrides: typing.Iterable[str]) -> Any:
    """Return a copy of ``cfg`` with dotted ``key=value`` overrides applied, each value parsed as its field's type.

    A value for a nested dataclass field may be a name understood by that class's ``from_name`` (for example
    ``model=B/16`` rebuilds the model config from the variant table, keeping nothing of the old one).
    """
    for text in overrides:
        key, raw = parse_override(text)
        cfg = _set(cfg, key.split("."), raw, key)
    return cfg


def _set(obj: Any, parts: list[str], raw: str, full: str) -> Any:
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        raise ConfigError(f"unknown config key '{full}': '{parts[0]}' is below a non-section value")
    hints = get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj) if f.init}
    name = parts[0]
    if name not in fields:
        prefix = full[: len(full) - len(".".join(parts))].rstrip(".")
        raise ConfigError(f"unknown config key '{full}' (valid under '{prefix or '<root>'}': {', '.join(sorted(fields))})")
    current = getattr(obj, name)
    if len(parts) > 1:
        new = _set(current, parts[1:], raw, full)
    else:
        new = _parse_value(raw, hints[name], full, current)
    try:
        return dataclasses.replace(obj, **{name: new})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid value for '{full}': {e}") from None


def _parse_value(raw: str, tp: Any, key: str, current: Any) -> Any:
    base = _strip_optional(tp)
    if dataclasses.is_dataclass(base):
        if hasattr(base, "from_name"):
            try:
                return base.from_name(raw)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"invalid value for '{key}': {e}") from None
        raise ConfigError(f"'{key}' is a section; set one of its fields, e.g. {key}.<field>=...")
    if raw.lower() in ("none", "null") and _is_optional(tp):
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # bare strings need no quotes: --set data.root=/data/cifar10
    if isinstance(value, str) and get_origin(base) in (tuple, list) and "," in raw:
        value = [json.loads(v) if _is_json(v) else v for v in raw.split(",")]
    return _coerce(value, tp, key)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a JSON-ish value to annotation ``tp``; raise ConfigError naming ``key`` on mismatch."""
    if tp is Any:
        return value
    if value is None:
        if _is_optional(tp):
            return None
        raise ConfigError(f"'{key}' cannot be none (expected {_tname(tp)})")
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{key}' expects {_tname(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"'{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, path=key)
        raise ConfigError(f"'{key}' expects a {tp.__name__} section, got {value!r}")
    if origin in (tuple, list):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{key}' expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"'{key}' expects {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, key) for v in value]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"'{key}' expects true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"'{key}' expects an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{key}' expects a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"'{key}' expects a string, got {value!r}")
        return str(value)
    return value


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except json.JSONDecodeError:
        return False


def _is_optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _strip_optional(tp: Any) -> Any:
    if _is_optional(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
