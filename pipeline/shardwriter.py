"""Write one WebDataset shard from a list of source items: validate/resize/re-encode, tar (atomically), sidecar.

`write_shard` is a pure unit of work (items in, shard + counts out) so local processes and Ray tasks can fan it out.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

from PIL import Image

from .config import IngestConfig
from .fsio import open_atomic, url_to_fs, write_atomic
from .manifest import ShardInfo
from .sources import SourceItem, read_items

log = logging.getLogger(__name__)

# Images above PIL's decompression-bomb limit are real photos at JFT scale, not attacks; decode them.
Image.MAX_IMAGE_PIXELS = None

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError)


@dataclass(frozen=True)
class ShardResult:
    """What writing one shard produced: its info, per-reason bad counts, and whether it was reused (resume)."""

    info: ShardInfo
    bad: dict[str, int]
    reused: bool = False


def sidecar_path(shard_path: str) -> str:
    """The small JSON written after a finished shard; its presence + fingerprint marks the shard complete."""
    return shard_path[: -len(".tar")] + ".info.json" if shard_path.endswith(".tar") else shard_path + ".info.json"


def plan_fingerprint(items: list[SourceItem], cfg: IngestConfig, class_index: dict[str, int], multi: bool) -> str:
    """Hash of everything that determines a shard's bytes (items, options, class map)."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.output_fingerprint(), sorted(class_index.items()), multi], sort_keys=True).encode())
    for it in items:
        h.update(f"{it.key}\0{it.url}\0{it.offset}\0{it.size}\0{','.join(it.labels)}\n".encode())
    return h.hexdigest()


def file_sha256(fs, path: str, chunk: int = 1 << 22) -> str:
    """sha256 hex digest of a file, read in `chunk`-byte pieces (shards can be GBs)."""
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def reusable_shard(fs, path: str, fp: str, verify: bool = True) -> ShardResult | None:
    """The recorded result of the complete shard at `path`, or None when it has to be (re)written.

    Complete means: its sidecar is readable, has plan fingerprint `fp` and describes this shard, the size matches,
    and (`verify`) the bytes hash to the sidecar's sha256, so a shard corrupted in place at the same size is
    rewritten rather than reused.
    """
    side = sidecar_path(path)
    if not (fs.exists(side) and fs.exists(path)):
        return None
    try:
        with fs.open(side, "rb") as f:
            meta = json.loads(f.read())
        info, bad = ShardInfo(**meta["info"]), {str(k): int(v) for k, v in meta["bad"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("shard %s: unreadable sidecar (%s); rewriting the shard", path, e)
        return None
    if meta.get("fingerprint") != fp or info.name != path.rsplit("/", 1)[-1] or fs.size(path) != info.num_bytes:
        return None
    if verify and file_sha256(fs, path) != info.sha256:
        log.warning("shard %s: sha256 differs from its sidecar (changed since it was written); rewriting it", path)
        return None
    return ShardResult(info, bad, reused=True)


def encode_image(data: bytes, cfg: IngestConfig) -> tuple[bytes, str, tuple[int, int], bool]:
    """(bytes to store, extension, stored (w, h), passed_through) for one source image; raises on corrupt data.

    A JPEG that needs no resize is validated by a reduced-size decode (`draft`: all entropy-coded data is still
    parsed, so truncation is caught) and stored byte-for-byte; anything else is decoded, resized, re-encoded.
    """
    img = Image.open(io.BytesIO(data))
    w, h = img.size
    needs_resize = cfg.resize_short is not None and min(w, h) > cfg.resize_short
    if img.format == "JPEG" and not needs_resize:
        img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
        img.load()
        return data, "jpg", (w, h), True
    if needs_resize:
        s = cfg.resize_short / min(w, h)
        tw, th = max(1, round(w * s)), max(1, round(h * s))
        if img.format == "JPEG":
            img.draft("RGB", (tw, th))  # DCT-domain downscale to >= target: much faster decode of big photos
        img = img.convert("RGB").resize((tw, th), Image.BICUBIC)
    else:
        img.load()
        img = img.convert("RGB")
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=cfg.quality)
    return out.getvalue(), "jpg", img.size, False


class _HashingWriter:
    """File wrapper counting and hashing the bytes written through it (sha256 without re-reading the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def write_shard(
    items: list[SourceItem],
    shard_url: str,
    cfg: IngestConfig,
    class_index: dict[str, int],
    multi_label: bool,
    storage_options: dict | None = None,
    counter=None,
) -> ShardResult:
    """Write `items` as one shard at `shard_url` (atomically, see `fsio.open_atomic`; then a sidecar) and return
    its result.

    Skips the work when a complete shard with the same plan fingerprint is already there (resume; with
    `cfg.verify_reused` its sha256 is checked first, see `reusable_shard`). Bad items are skipped and counted per
    reason ("unreadable", "corrupt"). `counter` (a multiprocessing Value) is bumped per item for progress bars.
    """
    fs, path = url_to_fs(shard_url, storage_options, fresh=True)
    name = shard_url.rsplit("/", 1)[-1]
    fp = plan_fingerprint(items, cfg, class_index, multi_label)
    side = sidecar_path(path)
    done = reusable_shard(fs, path, fp, verify=cfg.verify_reused)
    if done is not None:
        if counter is not None:
            with counter.get_lock():
                counter.value += len(items)
        return done
    bad: Counter = Counter()
    fs_cache: dict = {}
    n = 0
    index: dict = {"keys": [], "labels": []}  # key + first label per sample, tar order: for subset.py (no decode)
    with open_atomic(fs, path) as raw:
        hw = _HashingWriter(raw)
        with tarfile.open(fileobj=hw, mode="w|", format=tarfile.GNU_FORMAT) as tf:
            for it, data in zip(items, read_items(items, fs_cache, storage_options)):
                if isinstance(data, BaseException):
                    if not isinstance(data, (OSError, ValueError, EOFError)):
                        raise data
                    bad["unreadable"] += 1
                    data = None
                if data is not None:
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # PIL warns on odd EXIF; the decode result decides
                            out, ext, (w, h), passed = encode_image(data, cfg)
                    except _DECODE_ERRORS:
                        bad["corrupt"] += 1
                        out = None
                    if out is not None:
                        labels = sorted({class_index[c] for c in it.labels})  # a label set: canonical order
                        _add(tf, f"{it.key}.{ext}", out)
                        if multi_label:
                            _add(tf, f"{it.key}.labels", ",".join(map(str, labels)).encode())
                        else:
                            _add(tf, f"{it.key}.cls", str(labels[0]).encode())
                        meta = {"labels": list(it.labels), "source": it.origin, "width": w, "height": h}
                        _add(tf, f"{it.key}.json", json.dumps(meta, sort_keys=True).encode())
                        if cfg.keep_original and not passed:
                            _add(tf, f"{it.key}.orig.{it.ext or 'bin'}", data)
                        n += 1
                        index["keys"].append(it.key)
                        index["labels"].append(labels[0])
                if counter is not None:
                    with counter.get_lock():
                        counter.value += 1
    info = ShardInfo(name=name, num_samples=n, num_bytes=hw.n, sha256=hw.sha.hexdigest())
    write_atomic(fs, side, json.dumps({"fingerprint": fp, "info": asdict(info), "bad": dict(bad),
                                       "index": index}).encode())
    return ShardResult(info, dict(bad))
