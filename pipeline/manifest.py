"""The shard manifest (`manifest.json`): shard list (names checked to stay inside the manifest folder), class map,
source, options, bad-input counts, exclusions. The fsspec helpers (atomic writes, URL joins) live in `fsio`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

# the fsspec helpers live in fsio; re-exported here, where writers have always imported them from
from .fsio import check_relative_path, join_url, url_to_fs, write_atomic, write_bytes_atomic  # noqa: F401

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


def check_shard_name(name: str) -> str:
    """`name` if it is a valid shard name, else ValueError naming it.

    A shard name is a relative path inside the manifest's folder ending in `.tar`: `shard-000000.tar`, or with
    sub-folders `train/part-0/shard-000000.tar` (segments of `[A-Za-z0-9._=+-]`, none starting with `.`). No `..`,
    no absolute path, no `scheme://`, no backslash: a crafted manifest cannot point the reader elsewhere.
    """
    return check_relative_path(name, "shard name", suffix=".tar")


@dataclass(frozen=True)
class ShardInfo:
    """One written shard: file name (relative to the manifest), sample count, byte size and sha256 of its bytes."""

    name: str
    num_samples: int
    num_bytes: int
    sha256: str

    def __post_init__(self) -> None:
        check_shard_name(self.name)


@dataclass
class Manifest:
    """Everything a reader needs about a shard set: shards, class map, source, options, bad-input counts.

    `exclude` maps shard name -> keys to skip when streaming (dedup against downstream test sets); the stream
    removes them before computing its order, so batch counts stay exact.
    """

    shards: list[ShardInfo]
    classes: list[str]
    multi_label: bool = False
    source: str = ""
    options: dict = field(default_factory=dict)
    bad: dict[str, int] = field(default_factory=dict)
    exclude: dict[str, list[str]] = field(default_factory=dict)
    base_url: str = ""
    version: int = MANIFEST_VERSION

    @property
    def num_samples(self) -> int:
        """Samples over all shards (before exclusions)."""
        return sum(s.num_samples for s in self.shards)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_excluded(self) -> int:
        return sum(len(v) for v in self.exclude.values())

    def url(self, shard: ShardInfo | str | int) -> str:
        """Full URL of a shard (by info, name or index); a name is checked with `check_shard_name`."""
        if isinstance(shard, int):
            shard = self.shards[shard]
        name = shard.name if isinstance(shard, ShardInfo) else check_shard_name(shard)
        return join_url(self.base_url, name)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("base_url")
        d["num_samples"] = self.num_samples
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], base_url: str = "") -> "Manifest":
        """Build from `to_dict` output; raises ValueError on a newer version or an invalid shard name."""
        if d.get("version", 1) > MANIFEST_VERSION:
            raise ValueError(f"manifest version {d['version']} is newer than this vitpipe ({MANIFEST_VERSION})")
        return cls(
            shards=[ShardInfo(**s) for s in d["shards"]],
            classes=list(d["classes"]),
            multi_label=bool(d.get("multi_label", False)),
            source=d.get("source", ""),
            options=dict(d.get("options", {})),
            bad={k: int(v) for k, v in d.get("bad", {}).items()},
            exclude={k: list(v) for k, v in d.get("exclude", {}).items()},
            base_url=base_url,
            version=d.get("version", MANIFEST_VERSION),
        )

    @classmethod
    def load(cls, url: str, storage_options: dict | None = None) -> "Manifest":
        """Read `<url>/manifest.json` (or `url` itself when it names the JSON file).

        Raises FileNotFoundError when it is missing and ValueError (one line naming the manifest and the cause,
        e.g. a shard name outside the manifest's folder) when it is invalid."""
        if url.endswith(".json"):
            json_url, base = url, url.rsplit("/", 1)[0] if "/" in url else "."
        else:
            json_url, base = join_url(url, MANIFEST_NAME), url.rstrip("/")
        fs, path = url_to_fs(json_url, storage_options)
        if not fs.exists(path):
            raise FileNotFoundError(f"no shard manifest at {json_url} (run ingest first, or it did not finish)")
        with fs.open(path, "rb") as f:
            raw = f.read()
        try:
            return cls.from_dict(json.loads(raw), base_url=base)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise ValueError(f"invalid shard manifest {json_url}: {why}") from None

    def save(self, url: str | None = None, storage_options: dict | None = None) -> str:
        """Write `manifest.json` atomically under `url` (default: where it was loaded from); returns its URL."""
        base = (url or self.base_url).rstrip("/")
        if not base:
            raise ValueError("Manifest.save needs a URL (this manifest was not loaded from one)")
        json_url = join_url(base, MANIFEST_NAME)
        fs, path = url_to_fs(json_url, storage_options)
        write_atomic(fs, path, json.dumps(self.to_dict(), indent=1).encode())
        self.base_url = base
        return json_url

    def with_exclusions(self, exclude: dict[str, list[str]]) -> "Manifest":
        """A copy whose exclusion list is merged with `exclude` ({shard name: [keys]}); unknown shards raise."""
        names = {s.name for s in self.shards}
        unknown = sorted(set(exclude) - names)
        if unknown:
            raise ValueError(f"exclusion list names shards not in this manifest: {unknown[:3]}")
        merged = {k: list(v) for k, v in self.exclude.items()}
        for shard, keys in exclude.items():
            merged[shard] = sorted(set(merged.get(shard, [])) | set(keys))
        return replace(self, exclude=merged)


def load_exclusions(url: str, storage_options: dict | None = None) -> dict[str, list[str]]:
    """Read an exclusion list JSON: `{shard name: [keys]}` or `{"exclude": {...}}` (a dedup report)."""
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"exclusion list not found: {url}")
    with fs.open(path, "rb") as f:
        d = json.loads(f.read())
    d = d.get("exclude", d)
    if not isinstance(d, dict) or not all(isinstance(v, list) for v in d.values()):
        raise ValueError(f"exclusion list {url} must map shard names to lists of keys")
    return d
