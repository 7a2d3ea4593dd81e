"""Ingest sources as flat lists of `SourceItem`: image folders, tar/WebDataset shards, list files of (URL, labels).

Listing is cheap and deterministic (sorted); bytes are read later, in the process that writes the shard.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from .fsio import join_url, url_to_fs
from .manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

IMAGE_EXTS = {"jpg", "jpeg", "png", "gif", "bmp", "webp", "tif", "tiff", "ppm"}
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class SourceItem:
    """One source image: where its bytes are (a file, or a byte range of a tar), its labels (class names)."""

    key: str
    """Unique sample key, no dots (WebDataset splits member names at the first dot)."""
    url: str
    """fsspec URL of the file holding the bytes."""
    labels: tuple[str, ...]
    """Class names (one for single-label data)."""
    ext: str
    """Lower-case image extension at the source ("jpg", "png", ...)."""
    size: int = -1
    """Byte size of the image (-1: unknown)."""
    offset: int | None = None
    """Byte offset inside `url` (tar members); None: the whole file."""
    origin: str = ""
    """Human-readable origin (relative path / tar member), stored in the sample's JSON."""


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: letters, digits, '_' and '-' only."""
    return _KEY_BAD.sub("_", text)


def unique_keys(raw: list[str]) -> list[str]:
    """Sanitised keys, de-collided deterministically with a numeric suffix."""
    out, seen = [], set()
    for r in raw:
        k = base = sanitize_key(r) or "sample"
        n = 1
        while k in seen:
            k, n = f"{base}_{n}", n + 1
        seen.add(k)
        out.append(k)
    return out


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""


def list_image_folder(root: str, split: str | None = None, storage_options: dict | None = None,
                      skipped: Counter | None = None) -> list[SourceItem]:
    """Items of `<root>/<class>/**/<img>` (or `<root>/<split>/<class>/**/<img>`), sorted by path.

    Symlinks (local folders): a file symlink is followed only when its target lies inside `root` (the item then
    reads the resolved target); one resolving outside `root` is left out, as is every directory symlink (never
    descended into: no escapes, no cycles). Left-out entries are counted per reason in `skipped`
    ("symlink_outside_root", "symlink_dir") and logged.
    """
    base = join_url(root, split) if split else root.rstrip("/")
    fs, path = url_to_fs(base, storage_options)
    if not fs.isdir(path):
        raise FileNotFoundError(f"image folder not found: {base}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    found = fs.find(path, detail=True)
    path = path.rstrip("/")
    left_out: Counter = Counter()
    resolve = _InsideRoot(url_to_fs(root, storage_options)[1]) if isinstance(fs, LocalFileSystem) else None
    rows = []
    for p, info in sorted(found.items()):
        rel = p[len(path) + 1 :]
        parts = rel.split("/")
        url = prefix + p
        if resolve is not None:
            real, why = resolve(p, bool(info.get("islink")))
            if why == "symlink_dir" or (why and len(parts) >= 2 and _ext(p) in IMAGE_EXTS):
                left_out[why] += 1
                log.debug("image folder %s: left out %s (%s -> %s)", base, rel, why, real)
                continue
            url = real if info.get("islink") else url
        if len(parts) < 2 or _ext(p) not in IMAGE_EXTS:
            continue  # files at the top level or non-images (README, .DS_Store) are not samples
        rows.append((rel, parts[0], url, int(info.get("size") or -1)))
    if left_out:
        log.warning("image folder %s: left out %s (symlinks are followed only to files inside %s)", base,
                    dict(sorted(left_out.items())), root)
    if skipped is not None:
        skipped.update(left_out)
    if not rows:
        extra = f" ({dict(left_out)} left out)" if left_out else ""
        raise FileNotFoundError(f"no images found under {base} (expected <class>/<image> sub-folders){extra}")
    keys = unique_keys([rel.rsplit(".", 1)[0] for rel, *_ in rows])
    return [
        SourceItem(key=k, url=u, labels=(c,), ext=_ext(rel), size=s, origin=rel)
        for k, (rel, c, u, s) in zip(keys, rows)
    ]


class _InsideRoot:
    """Resolves local paths and says whether they stay inside `root` (symlinks and `..` resolved)."""

    def __init__(self, root: str):
        self.root = os.path.realpath(root)
        self._dirs: dict[str, str] = {}

    def _inside(self, real: str) -> bool:
        return real == self.root or real.startswith(self.root.rstrip(os.sep) + os.sep)

    def __call__(self, p: str, islink: bool) -> tuple[str, str]:
        """(resolved path, reason to leave it out or "")."""
        if islink:
            real = os.path.realpath(p)
            if os.path.isdir(real):
                return real, "symlink_dir"
        else:  # only the folder can hold a link: resolve each folder once, not every file
            folder, _, name = p.rpartition("/")
            if folder not in self._dirs:
                self._dirs[folder] = os.path.realpath(folder or "/")
            real = os.path.join(self._dirs[folder], name)
        return real, "" if self._inside(real) else "symlink_outside_root"


def _tar_urls(src: str, fs, path: str) -> list[str]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if fs.isdir(path):
        return [prefix + p for p in sorted(fs.glob(path.rstrip("/") + "/*.tar"))]
    if any(ch in src for ch in "*?[{"):
        import braceexpand  # webdataset's dependency; expands shard-{000..009}.tar

        return sorted({prefix + p for pat in braceexpand.braceexpand(path) for p in fs.glob(pat)})
    return [prefix + path]


def _labels_of(members: dict[str, bytes], class_names: list[str] | None) -> tuple[str, ...] | None:
    if "json" in members:
        meta = json.loads(members["json"])
        if isinstance(meta, dict) and "labels" in meta:
            return tuple(str(x) for x in meta["labels"])
        if isinstance(meta, dict) and "label" in meta:
            return (str(meta["label"]),)
    ints = None
    if "labels" in members:
        ints = [int(x) for x in members["labels"].decode().split(",") if x.strip()]
    elif "cls" in members:
        ints = [int(members["cls"].decode().strip())]
    if ints is not None:
        return tuple(class_names[i] if class_names and 0 <= i < len(class_names) else str(i) for i in ints)
    if "txt" in members:
        return (members["txt"].decode().strip(),)
    return None


def list_tar_source(src: str, storage_options: dict | None = None) -> tuple[list[SourceItem], list[str] | None]:
    """Items of existing tar/WebDataset shards (a .tar, a folder of .tar, or a brace/glob pattern).

    Returns (items, class names from a `manifest.json` next to the tars, if any). Labels come from the sample's
    `.json` ("labels"/"label"), `.labels`/`.cls` (indices, mapped through the manifest's classes), or `.txt`.
    Items without an image or without labels get the label `None` marker and are counted bad by ingest.
    """
    fs, path = url_to_fs(src, storage_options)
    urls = _tar_urls(src, fs, path)
    if not urls:
        raise FileNotFoundError(f"no .tar shards found at {src}")
    class_names = None
    man_dir = path.rstrip("/") if fs.isdir(path) else path.rsplit("/", 1)[0]
    if fs.exists(man_dir + "/" + MANIFEST_NAME):
        with fs.open(man_dir + "/" + MANIFEST_NAME, "rb") as f:
            class_names = json.loads(f.read()).get("classes")
    items = []
    for url in urls:
        tfs, tpath = url_to_fs(url, storage_options)
        if not tfs.exists(tpath):
            raise FileNotFoundError(f"tar shard not found: {url}")
        groups: dict[str, dict] = {}
        with tfs.open(tpath, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                name = m.name
                d, base = (name.rsplit("/", 1) if "/" in name else ("", name))
                if "." not in base:
                    continue
                stem, ext = base.split(".", 1)
                g = groups.setdefault((d + "/" if d else "") + stem, {"small": {}, "img": None})
                if ext.lower() in IMAGE_EXTS and g["img"] is None:
                    g["img"] = (ext.lower(), m.offset_data, m.size, name)
                elif ext in ("cls", "labels", "txt", "json") and m.size < 1 << 20:
                    g["small"][ext] = tf.extractfile(m).read()
        tar_name = url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        for key in sorted(groups):
            g = groups[key]
            labels = _labels_of(g["small"], class_names)
            ext, off, size, name = g["img"] if g["img"] else ("", None, -1, key)
            items.append(SourceItem(key=key, url=url, labels=labels if labels is not None else (),
                                    ext=ext, size=size, offset=off if g["img"] else -1,
                                    origin=f"{tar_name}/{name}"))
    keys = unique_keys([it.key for it in items])
    items = [SourceItem(**{**it.__dict__, "key": k}) for k, it in zip(keys, items)]
    return items, class_names


def list_file_source(src: str, storage_options: dict | None = None) -> list[SourceItem]:
    """Items of a list file: one `URL<TAB>label[,label...]` row per image; `#` comments; relative URLs resolve
    against the list file's folder. Rows without labels are kept with no labels (counted bad by ingest)."""
    fs, path = url_to_fs(src, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"list file not found: {src}")
    base = src.rsplit("/", 1)[0] if "/" in src else "."
    with fs.open(path, "rt") as f:
        lines = f.read().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split(None, 1)
        url = parts[0].strip()
        labels = tuple(x.strip() for x in parts[1].split(",") if x.strip()) if len(parts) > 1 else ()
        if "://" not in url and not url.startswith("/"):
            url = join_url(base, url)
        rows.append((url, labels))
    if not rows:
        raise ValueError(f"list file {src} has no rows (expected URL<TAB>labels)")
    keys = unique_keys([u.split("://", 1)[-1].rsplit(".", 1)[0].lstrip("/") for u, _ in rows])
    return [SourceItem(key=k, url=u, labels=lab, ext=_ext(u), origin=u) for k, (u, lab) in zip(keys, rows)]


def list_source(src: str, split: str | None = None, storage_options: dict | None = None,
                skipped: Counter | None = None):
    """Dispatch on the source's shape: list file (.txt/.tsv/.csv), tar(s), or image folder.

    Returns (items, class names known from the source or None); entries an image folder leaves out for safety
    (symlinks, see `list_image_folder`) are counted per reason in `skipped`."""
    lower = src.lower().rstrip("/")
    if lower.endswith((".txt", ".tsv", ".lst")):
        return list_file_source(src, storage_options), None
    if lower.endswith(".tar") or "{" in src or "*" in src:
        return list_tar_source(src, storage_options)
    fs, path = url_to_fs(src, storage_options)
    if fs.isdir(path) and fs.glob(path.rstrip("/") + "/*.tar"):
        return list_tar_source(src, storage_options)
    return list_image_folder(src, split, storage_options, skipped), None


def _proto(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def _fs_for(url: str, fs_cache: dict, storage_options: dict | None):
    proto = _proto(url)
    if proto not in fs_cache:
        fs_cache[proto] = url_to_fs(url, storage_options, fresh=True)[0]
    return fs_cache[proto]


def read_items(items: list[SourceItem], fs_cache: dict, storage_options: dict | None = None, batch: int = 64,
               max_gap: int = 1 << 16):
    """Each item's bytes, or the exception reading it raised, in order - `batch` items per round trip.

    One `cat_ranges` call per batch (object stores fetch its ranges concurrently), and members of the same tar
    that lie within `max_gap` bytes of each other are read as one range (tar headers and label members between
    images are small), so ingesting a WebDataset from S3 costs a few large reads, not one request per image.
    """
    for b0 in range(0, len(items), batch):
        chunk = items[b0 : b0 + batch]
        out: list = [None] * len(chunk)
        spans: list[list] = []  # [url, start, end, [(index in chunk, offset, size or None)]]
        for j in sorted(range(len(chunk)), key=lambda j: (chunk[j].url, chunk[j].offset or 0)):
            it = chunk[j]
            if it.offset is not None and it.offset < 0:
                out[j] = FileNotFoundError(f"no image member for {it.origin}")
            elif it.offset is None:
                spans.append([it.url, None, None, [(j, 0, None)]])
            elif spans and spans[-1][0] == it.url and spans[-1][1] is not None and \
                    it.offset - spans[-1][2] <= max_gap:
                spans[-1][2] = max(spans[-1][2], it.offset + it.size)
                spans[-1][3].append((j, it.offset, it.size))
            else:
                spans.append([it.url, it.offset, it.offset + it.size, [(j, it.offset, it.size)]])
        by_proto: dict[str, list] = {}
        for sp in spans:
            by_proto.setdefault(_proto(sp[0]), []).append(sp)
        for group in by_proto.values():
            fs = _fs_for(group[0][0], fs_cache, storage_options)
            datas = fs.cat_ranges([fs._strip_protocol(sp[0]) for sp in group], [sp[1] for sp in group],
                                  [sp[2] for sp in group], on_error="return")
            for (url, start, _end, members), data in zip(group, datas):
                for j, off, size in members:
                    if isinstance(data, BaseException) or start is None:
                        out[j] = data
                    elif off - start + size > len(data):
                        out[j] = EOFError(f"{url}: member at byte {off} cut short")
                    else:
                        out[j] = data[off - start : off - start + size]
        yield from out
