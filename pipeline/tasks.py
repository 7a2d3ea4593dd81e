"""Downstream tasks as data (no training code): labelled train/test splits that load only the images asked for.

Used by few-shot linear probes (embed the sampled shots + the test split) and fine-tuning.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from .manifest import url_to_fs
from .sources import list_image_folder
from .transforms import ImageTransform, normalize_batch

SPLITS = ("train", "test")


class Task(Protocol):
    """What evaluation stages need from a downstream dataset."""

    name: str
    classes: list[str]
    train_labels: np.ndarray
    test_labels: np.ndarray

    @property
    def num_train(self) -> int: ...

    @property
    def num_test(self) -> int: ...

    def load(self, split: str, indices) -> list[Image.Image]: ...

    def batches(self, split: str, indices, transform: ImageTransform,
                batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


class _TaskBase:
    """Shared plumbing: sizes, label lookup, batching through a transform (decode in a thread pool: PIL releases
    the GIL while decoding)."""

    name: str
    classes: list[str]
    train_labels: np.ndarray
    test_labels: np.ndarray
    decode_threads: int = 2

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def labels(self, split: str) -> np.ndarray:
        _check_split(split)
        return self.train_labels if split == "train" else self.test_labels

    def _indices(self, split: str, indices) -> np.ndarray:
        n = len(self.labels(split))
        idx = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"{self.name}: {split} indices must be in [0, {n}), got [{idx.min()}, {idx.max()}]")
        return idx

    def _raw(self, split: str, i: int):  # bytes or PIL image of one sample
        raise NotImplementedError

    def load(self, split: str, indices=None) -> list[Image.Image]:
        """RGB PIL images of `split` at `indices` (all when None); only those are read."""
        idx = self._indices(split, indices)
        return [self._to_pil(self._raw(split, int(i))) for i in idx]

    @staticmethod
    def _to_pil(raw) -> Image.Image:
        img = raw if isinstance(raw, Image.Image) else Image.open(io.BytesIO(raw))
        return img.convert("RGB")

    def batches(self, split: str, indices, transform: ImageTransform, batch_size: int = 256,
                rng_seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images (B,3,H,W) float32, labels int64 (B,)) over `indices` in order; train transforms get per-image
        rngs derived from (rng_seed, index)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        idx = self._indices(split, indices)
        labels = self.labels(split)

        def one(i: int) -> np.ndarray:
            rng = np.random.default_rng([rng_seed, i]) if transform.train else None
            return transform.to_uint8(self._raw(split, i), rng)

        with ThreadPoolExecutor(self.decode_threads) as pool:
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size].tolist()
                arr = np.stack(list(pool.map(one, chunk)))
                yield (normalize_batch(arr, transform.mean, transform.std),
                       torch.as_tensor(labels[chunk], dtype=torch.int64))


class ImageFolderTask(_TaskBase):
    """`<root>/{train,test}/<class>/*` (any fsspec URL); class map = sorted class folders of the train split."""

    def __init__(self, root: str, name: str | None = None, storage_options: dict | None = None):
        self.root = root.rstrip("/")
        self.name = name or self.root.rsplit("/", 1)[-1]
        self.storage_options = storage_options
        items = {s: list_image_folder(self.root, s, storage_options) for s in SPLITS}
        self.classes = sorted({it.labels[0] for it in items["train"]})
        index = {c: i for i, c in enumerate(self.classes)}
        unknown = sorted({it.labels[0] for it in items["test"]} - set(index))
        if unknown:
            raise ValueError(f"{self.name}: test classes missing from train: {unknown[:3]}")
        self._urls = {s: [it.url for it in items[s]] for s in SPLITS}
        self.train_labels = np.array([index[it.labels[0]] for it in items["train"]], dtype=np.int64)
        self.test_labels = np.array([index[it.labels[0]] for it in items["test"]], dtype=np.int64)
        self._fs = None

    def paths(self, split: str) -> list[str]:
        _check_split(split)
        return self._urls[split]

    def _raw(self, split: str, i: int) -> bytes:
        if self._fs is None:
            self._fs = url_to_fs(self.root, self.storage_options)[0]
        return self._fs.cat_file(self._fs._strip_protocol(self._urls[split][i]))

    def __getstate__(self):  # filesystems are per process
        return {**self.__dict__, "_fs": None}


class DigitsTask(_TaskBase):
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes) as RGB images upsampled to `size`, with a
    fixed stratified train/test split (`test_fraction`, seed 0): a download-free downstream task."""

    def __init__(self, size: int = 32, test_fraction: float = 0.3):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if not 0 < test_fraction < 1:
            raise ValueError(f"DigitsTask.test_fraction must be in (0, 1), got {test_fraction}")
        d = load_digits()
        idx_train, idx_test = train_test_split(np.arange(len(d.target)), test_size=test_fraction,
                                               stratify=d.target, random_state=0)
        self.name, self.size = "digits", size
        self.classes = [str(i) for i in range(10)]
        gray = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        self._images = {"train": gray[idx_train], "test": gray[idx_test]}
        self.train_labels = d.target[idx_train].astype(np.int64)
        self.test_labels = d.target[idx_test].astype(np.int64)

    def _raw(self, split: str, i: int) -> Image.Image:
        img = Image.fromarray(self._images[split][i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB")


class ShardSetTask(_TaskBase):
    """Train/test splits that were ingested as shard sets (two manifests), read by random access into the tars.

    Opening indexes each tar's members once (header scan, no image decoding); `load` then reads only the asked-for
    images with one ranged read each. Single-label shard sets only (few-shot probes need one class per image).
    """

    def __init__(self, train_manifest: str, test_manifest: str, name: str = "shards",
                 storage_options: dict | None = None):
        import tarfile

        from .manifest import Manifest

        self.name, self.storage_options = name, storage_options
        mans = {"train": Manifest.load(train_manifest, storage_options),
                "test": Manifest.load(test_manifest, storage_options)}
        if mans["train"].multi_label or mans["test"].multi_label:
            raise ValueError(f"{name}: few-shot / fine-tune tasks need single-label shard sets")
        self.classes = list(mans["train"].classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self._where: dict[str, list[tuple[str, int, int]]] = {}
        labels: dict[str, list[int]] = {}
        for split, man in mans.items():
            rows, labs = [], []
            for shard in man.shards:
                url = man.url(shard)
                fs, path = url_to_fs(url, storage_options)
                with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tf:
                    members, cls = {}, {}
                    for m in tf:  # streaming scan: headers only; .cls payloads are tiny
                        key, _, ext = m.name.partition(".")
                        if ext in ("jpg", "jpeg", "png", "webp"):
                            members[key] = (m.offset_data, m.size)
                        elif ext == "cls":
                            cls[key] = int(tf.extractfile(m).read())
                for key, (off, size) in members.items():
                    name_ = man.classes[cls[key]]
                    if name_ not in index:
                        raise ValueError(f"{self.name}: {split} class '{name_}' missing from the train split")
                    rows.append((url, off, size))
                    labs.append(index[name_])
            self._where[split], labels[split] = rows, labs
        self.train_labels = np.array(labels["train"], dtype=np.int64)
        self.test_labels = np.array(labels["test"], dtype=np.int64)

    def _raw(self, split: str, i: int) -> bytes:
        url, off, size = self._where[split][i]
        fs, path = url_to_fs(url, self.storage_options)
        with fs.open(path, "rb") as f:
            f.seek(off)
            return f.read(size)
