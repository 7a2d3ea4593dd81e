"""Per-rank listings of the files in a checkpoint, and the check that a checkpoint is complete.

Every rank writes ``ranks/rank{r:05d}.json`` (each file it saved, with its size) into its own checkpoint folder, after
its shard; rank 0 also writes the meta (``vitpipe_meta.json``, with the world size). Ray merges the ranks' folders
in storage. A checkpoint counts only when the meta is there, every rank 0..world-1 has a listing, and every listed
file exists with the listed size: a rank that died before saving, an upload cut short or a truncated file all fail.
Sizes only (no checksums): hashing multi-GB shards would stall every save, and truncation is the failure seen in
practice.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fsspec.core import url_to_fs

from vitpipe.jobs.train.checkpoint import META

LISTINGS = "ranks"


def listing_name(rank: int) -> str:
    return f"{LISTINGS}/rank{rank:05d}.json"


def write_listing(directory: str, rank: int) -> dict[str, int]:
    """Record every file under the local ``directory`` (path relative to it -> bytes) as ``rank``'s listing; call it
    after everything else the rank saves there. Returns the listed files."""
    files: dict[str, int] = {}
    for root, _, names in os.walk(directory):
        for name in names:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory).replace(os.sep, "/")
            if not rel.startswith(f"{LISTINGS}/"):
                files[rel] = os.path.getsize(full)
    os.makedirs(os.path.join(directory, LISTINGS), exist_ok=True)
    with open(os.path.join(directory, listing_name(rank)), "w") as f:
        json.dump({"rank": rank, "files": files}, f, sort_keys=True)
    return files


def verify(directory: str, fs: Any = None, **storage_options: Any) -> list[str]:
    """Problems that make the checkpoint at ``directory`` unusable; empty if complete. ``directory``: a local path or
    fsspec URL, or a path on ``fs`` (an fsspec filesystem, e.g. ``ArrowFSWrapper`` of a Ray checkpoint's)."""
    if fs is None:
        fs, directory = url_to_fs(directory, **storage_options)
    root = directory.rstrip("/")
    try:
        meta = json.loads(fs.cat_file(f"{root}/{META}"))
        world = int(meta["world_size"])
    except FileNotFoundError:
        return [f"no {META} (rank 0 never finished its save)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"unreadable {META}: {e!r}"]
    problems = []
    for rank in range(world):
        name = listing_name(rank)
        try:
            files = json.loads(fs.cat_file(f"{root}/{name}"))["files"]
        except FileNotFoundError:
            problems.append(f"rank {rank} of {world} has no listing ({name})")
            continue
        except (ValueError, KeyError, TypeError) as e:
            problems.append(f"rank {rank}: unreadable listing {name}: {e!r}")
            continue
        for rel, size in sorted(files.items()):
            try:
                got = fs.size(f"{root}/{rel}")
            except FileNotFoundError:
                problems.append(f"rank {rank}: {rel} is missing")
                continue
            if got != size:
                problems.append(f"rank {rank}: {rel} has {got} bytes, {size} were saved")
    return problems
