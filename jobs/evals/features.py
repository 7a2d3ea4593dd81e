"""Frozen-feature extraction for probes: embedding functions over a task's images and an fsspec feature cache.

An *embedding function* ``embed_fn(split, indices) -> np.ndarray (len(indices), d)`` is the only thing the few-shot
evaluator needs; :func:`make_embed_fn` builds one from a model and a task, :class:`FeatureCache` makes one
incremental and persistent so a rerun with other shots or seeds embeds nothing it has already embedded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import fsspec
import numpy as np
import torch

__all__ = ["REPRESENTATIONS", "EmbedFn", "FeatureCache", "make_embed_fn", "model_fingerprint", "represent"]

log = logging.getLogger(__name__)

EmbedFn = Callable[[str, np.ndarray], np.ndarray]
REPRESENTATIONS = ("pre_logits", "token", "gap")


class _ImageTask(Protocol):
    name: str

    def load(self, split: str, indices: np.ndarray) -> list[Any]: ...


def represent(model: torch.nn.Module, x: torch.Tensor, representation: str) -> torch.Tensor:
    """(B, F) features of images ``x`` (B, 3, H, W).

    ``pre_logits``: the model's pre-logits (pooled, then Dense+tanh when the model has one; timm/big_vision).
    ``token``: the class token after the final LayerNorm. ``gap``: mean of the patch tokens after the final
    LayerNorm, prefix (class/register) tokens excluded.
    """
    if representation == "pre_logits":
        return model.pre_logits(x)
    if representation not in ("token", "gap"):
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    tokens = model.forward_features(x)
    prefix = int(model.num_prefix_tokens)
    if representation == "token":
        if prefix < 1:
            raise ValueError("representation 'token' needs a class token, but the model has no prefix tokens")
        return tokens[:, 0]
    return tokens[:, prefix:].mean(dim=1)


def _prefetch(it: Iterator[torch.Tensor], depth: int) -> Iterator[torch.Tensor]:
    """Run ``it`` in a background thread, ``depth`` items ahead of the consumer (decode overlaps the forward)."""
    if depth < 1:
        yield from it
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in it:
                if stop.is_set():
                    return
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer, with its traceback
            q.put(e)

    t = threading.Thread(target=worker, daemon=True, name="embed-prefetch")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while t.is_alive():  # unblock a worker waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(timeout=0.05)


def make_embed_fn(
    model: torch.nn.Module,
    task: _ImageTask,
    transform: Callable[[Any], torch.Tensor] | None = None,
    *,
    img_size: int | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    representation: str = "pre_logits",
    prefetch: int = 1,
) -> EmbedFn:
    """Embedding function for ``task``'s images through frozen ``model``.

    Give either ``transform`` (one PIL image -> normalised (3, H, W) tensor) or ``img_size`` (then the pipeline's
    eval transform, resize short side + centre crop, is used). With a pipeline ``ImageTransform`` and a task that
    has ``batches`` (``vitpipe.pipeline`` tasks), images are decoded to uint8 in the task's threads and normalised
    per batch in numpy; otherwise ``task.load`` decodes and ``transform`` runs per image. Either way decoding runs
    ``prefetch`` batches ahead in a background thread while the model embeds, and torch ops stay on the calling
    thread (torch intra-op threads started from a second thread contend badly on small machines). Batches run
    under ``torch.inference_mode`` with the model in eval mode.
    """
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if transform is None:
        if img_size is None:
            raise ValueError("make_embed_fn needs a transform or an img_size")
        from vitpipe.pipeline import ImageTransform  # the pipeline's eval transform: resize short side + centre crop

        transform = ImageTransform(img_size=img_size, train=False)
    model = model.eval().to(device)
    tf = transform
    batched = hasattr(task, "batches") and hasattr(tf, "to_uint8")

    def batches(split: str, indices: np.ndarray) -> Iterator[Any]:
        if batched:
            for x, _ in task.batches(split, indices, tf, batch_size):  # type: ignore[attr-defined]
                yield x
        else:
            for i in range(0, len(indices), batch_size):
                yield task.load(split, indices[i : i + batch_size])   # PIL decode only: no torch in this thread

    def embed_fn(split: str, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        out: list[np.ndarray] = []
        with torch.inference_mode():
            for item in _prefetch(batches(split, indices), prefetch):
                x = item if batched else torch.stack([tf(im) for im in item])
                out.append(represent(model, x.to(device), representation).float().cpu().numpy())
        if not out:
            raise ValueError(f"embed_fn got no {split} indices to embed")
        return np.concatenate(out, axis=0)

    return embed_fn


def model_fingerprint(model: torch.nn.Module, extra: dict | None = None) -> str:
    """Short sha256 of a model's parameters and buffers (names, shapes, bytes), plus ``extra``: a cache key for
    features when no stage key is at hand."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if extra:
        h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


_SAFE_PART = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]*")


def _slug(s: str) -> str:
    """One path segment for a cache key part (model key, task, split, ...) that cannot leave its folder.

    A part of letters, digits and ``._=-`` not starting with ``.`` is used as it is. Any other (slashes, ``..``
    inside, absolute paths, spaces, a leading dot) is sanitised and suffixed with 8 hex digits of its sha256, so
    it stays one segment inside the cache root and two different parts never share an entry (``a/b`` vs
    ``a_b``). ``""``, ``.`` and ``..`` are refused with a ValueError.
    """
    raw = str(s)
    if raw in ("", ".", ".."):
        raise ValueError(f"feature cache key part {raw!r} is not a name (empty, '.' and '..' are refused)")
    if _SAFE_PART.fullmatch(raw):
        return raw
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", raw).strip("_.")
    return f"{safe or 'part'}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"


class FeatureCache:
    """Per-(model, task, split, resolution, representation) feature store under any fsspec URL.

    Layout: ``<root>/<model_key>/<task>/<split>-r<resolution>-<representation>/{features.npy, indices.npy,
    meta.json}``, each key part one path segment inside the root (see ``_slug``); rows of ``features.npy`` belong
    to the dataset indices in ``indices.npy`` (sorted). ``meta.json`` is written last, so a cache entry is valid
    only when it is present and agrees with both arrays; an entry from an interrupted write is ignored and rebuilt.
    One writer per entry at a time (stages are keyed, so that holds).
    """

    def __init__(self, root: str) -> None:
        self.root = str(root).rstrip("/")
        self.fs, self._root_path = fsspec.core.url_to_fs(self.root)

    def entry_path(self, *, model_key: str, task: str, split: str, resolution: int | str | None,
                   representation: str) -> str:
        """Folder (filesystem path, no protocol) holding one entry."""
        res = "any" if resolution is None else resolution
        leaf = f"{_slug(split)}-r{_slug(str(res))}-{_slug(representation)}"
        return f"{self._root_path}/{_slug(model_key)}/{_slug(task)}/{leaf}"

    def _read(self, path: str) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with self.fs.open(f"{path}/meta.json", "r") as f:
                meta = json.load(f)
            with self.fs.open(f"{path}/indices.npy", "rb") as f:
                idx = np.load(f)
            with self.fs.open(f"{path}/features.npy", "rb") as f:
                feats = np.load(f)
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            return None
        if idx.shape[0] != meta.get("n") or feats.shape != (meta.get("n"), meta.get("dim")):
            log.warning("feature cache entry %s is inconsistent; rebuilding it", path)
            return None
        return idx, feats

    def _write(self, path: str, idx: np.ndarray, feats: np.ndarray) -> None:
        self.fs.makedirs(path, exist_ok=True)
        if self.fs.exists(f"{path}/meta.json"):
            self.fs.rm(f"{path}/meta.json")  # invalidate the entry before its arrays change
        for name, arr in (("indices.npy", idx), ("features.npy", feats)):
            with self.fs.open(f"{path}/{name}.tmp", "wb") as f:
                np.save(f, arr)
            self.fs.mv(f"{path}/{name}.tmp", f"{path}/{name}")
        with self.fs.open(f"{path}/meta.json.tmp", "w") as f:
            json.dump({"n": int(idx.shape[0]), "dim": int(feats.shape[1]), "dtype": str(feats.dtype)}, f)
        self.fs.mv(f"{path}/meta.json.tmp", f"{path}/meta.json")

    def features(
        self,
        embed_fn: EmbedFn,
        split: str,
        indices: np.ndarray,
        *,
        model_key: str,
        task: str,
        resolution: int | str | None,
        representation: str,
    ) -> np.ndarray:
        """Features for ``indices`` (in the order given); only indices missing from the cache go to ``embed_fn``,
        and the entry is then extended with them."""
        indices = np.asarray(indices, dtype=np.int64)
        path = self.entry_path(model_key=model_key, task=task, split=split, resolution=resolution,
                               representation=representation)
        cached = self._read(path)
        have_idx, have = cached if cached is not None else (np.zeros(0, np.int64), None)
        wanted = np.unique(indices)
        missing = np.setdiff1d(wanted, have_idx, assume_unique=True)
        if missing.size:
            new = np.asarray(embed_fn(split, missing), dtype=np.float32)
            if new.shape[0] != missing.size:
                raise ValueError(f"embed_fn returned {new.shape[0]} rows for {missing.size} indices")
            if have is not None and have.shape[1] != new.shape[1]:
                raise ValueError(f"feature dim changed for cache entry {path}: {have.shape[1]} -> {new.shape[1]}")
            all_idx = np.concatenate([have_idx, missing])
            all_feats = new if have is None else np.concatenate([have, new], axis=0)
            order = np.argsort(all_idx, kind="stable")
            have_idx, have = all_idx[order], all_feats[order]
            self._write(path, have_idx, have)
            log.info("feature cache %s: embedded %d new, %d total", path, missing.size, have_idx.size)
        assert have is not None
        return have[np.searchsorted(have_idx, indices)]

    def bind(self, embed_fn: EmbedFn, *, model_key: str, task: str, resolution: int | str | None,
             representation: str) -> EmbedFn:
        """``embed_fn`` wrapped so that every call goes through this cache."""

        def cached(split: str, indices: np.ndarray) -> np.ndarray:
            return self.features(embed_fn, split, indices, model_key=model_key, task=task,
                                 resolution=resolution, representation=representation)

        return cached


def bind_cache(embed_fn: EmbedFn, cache: "FeatureCache | None", *, evaluator: str, model_key: str | None,
               task: str, resolution: int | str | None, representation: str) -> EmbedFn:
    """``embed_fn`` through ``cache`` (unchanged without one); a cache needs the model's key, which names the
    entries: ValueError naming ``evaluator`` otherwise."""
    if cache is None:
        return embed_fn
    if not model_key:
        raise ValueError(f"{evaluator} with a feature cache needs a model_key")
    return cache.bind(embed_fn, model_key=model_key, task=task, resolution=resolution, representation=representation)

