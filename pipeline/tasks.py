"""Downstream tasks as data (no training code): labelled train/test splits that load only the images asked for.

Used by few-shot / kNN / linear probes (embed the images they need) and fine-tuning. Every task records how its
test split came to be (:meth:`split_info`): given on disk, a fixed library split, or held out of the only split
there is (stratified, seeded, with a digest of the held-out positions). :meth:`validation` gives the selection
protocol's view of a task: train minus a stratified slice, scored on that slice; it never reads the test split.
"""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Protocol

import numpy as np
import torch
from PIL import Image

from .manifest import join_url, url_to_fs
from .sources import list_image_folder
from .transforms import ImageTransform, normalize_batch

SPLITS = ("train", "test")
TEST_FOLDERS = ("test", "val", "valid", "validation")
"""Folder names taken as a folder task's test split, first found wins (``<root>/train`` must exist too)."""
DEFAULT_TEST_FRACTION = 0.2
"""Share of each class held out as the test split of a task that has no test split of its own."""
VAL_SUFFIX = ".val"
"""Name suffix of a task's validation view (``cifar10`` -> ``cifar10.val``): metric-safe, and it marks numbers
that may be used for selection."""


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


def holdout_fraction(num_train: int) -> float:
    """The paper's held-out share of train for choosing hyperparameters: 2% of large sets (>= 20,000 images),
    10% of small ones (ViT appendix B.1.1)."""
    return 0.02 if num_train >= 20_000 else 0.10


def index_digest(indices: np.ndarray) -> str:
    """Short sha256 of an index list (int64, in order): identifies a held-out split in reports and run records."""
    return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()[:16]


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out): sorted int64 positions into ``labels``, a pure function of (labels, fraction, seed).

    Each class holds out ``round(fraction * n_c)`` of its ``n_c`` examples, at least one and never all of them
    (a class with a single example stays whole in ``kept``); which ones is a per-class permutation drawn from
    ``seed`` (classes in increasing label order).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0 < fraction < 1:
        raise ValueError(f"held-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_out = min(max(1, int(round(fraction * members.size))), members.size - 1)
        held.append(rng.permutation(members)[:n_out])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(labels.size, dtype=np.int64), held_idx, assume_unique=True)
    return kept, held_idx


class _TaskBase:
    """Shared plumbing: sizes, label lookup, batching through a transform (decode in a thread pool: PIL releases
    the GIL while decoding), split records and validation views."""

    name: str
    classes: list[str]
    train_labels: np.ndarray
    test_labels: np.ndarray
    decode_threads: int = 2
    resolution: int | None = None
    """Probe resolution asked for by the task spec (``name@64=...``); None: the model's own."""
    _split: dict = {"kind": "given"}

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

    def split_info(self) -> dict:
        """How the splits were made, JSON-ready: ``kind`` (``given`` on disk, ``fixed`` by a library split,
        ``held_out`` from the only split, ``validation`` view), sizes, and for held-out splits the seed, fraction
        and a digest of the held-out positions (in the source split's order)."""
        return {"task": self.name, **self._split, "sizes": {"train": self.num_train, "test": self.num_test}}

    def validation(self, fraction: float | None = None, seed: int = 0) -> TaskView:
        """The selection protocol's view: train = train minus a stratified held-out slice, test = that slice.

        ``fraction`` None: :func:`holdout_fraction` (2% / 10%). Named ``<name>.val``; reads only this task's train
        images, never its test split.
        """
        frac = holdout_fraction(self.num_train) if fraction is None else float(fraction)
        kept, held = stratified_holdout(self.train_labels, frac, seed)
        info = {"kind": "validation", "from_split": "train", "seed": int(seed), "fraction": frac,
                "held_out_digest": index_digest(held), "base": self.split_info()}
        return TaskView(self, self.name + VAL_SUFFIX, {"train": ("train", kept), "test": ("train", held)}, info)

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

    def _hold_out_test(self, labels: np.ndarray, fraction: float, seed: int, source: str) -> tuple[np.ndarray,
                                                                                                    np.ndarray]:
        """Positions (train, test) of a test split carved out of the only split, recorded in ``split_info``."""
        kept, held = stratified_holdout(labels, fraction, seed)
        self._split = {"kind": "held_out", "from_split": source, "seed": int(seed), "fraction": float(fraction),
                       "held_out_digest": index_digest(held)}
        return kept, held


class TaskView(_TaskBase):
    """A task whose splits are index subsets of another task's splits (e.g. :meth:`_TaskBase.validation`).

    ``maps[split] = (base_split, base_indices)``: row ``i`` of ``split`` is row ``base_indices[i]`` of the base's
    ``base_split``. Images are read through the base, so only the mapped rows are ever touched.
    """

    def __init__(self, base: _TaskBase, name: str, maps: dict[str, tuple[str, np.ndarray]], info: dict):
        if set(maps) != set(SPLITS):
            raise ValueError(f"a task view needs maps for {SPLITS}, got {sorted(maps)}")
        self.base, self.name, self.classes = base, name, list(base.classes)
        self.decode_threads, self.resolution = base.decode_threads, base.resolution
        self._maps = {s: (bs, np.asarray(bi, dtype=np.int64)) for s, (bs, bi) in maps.items()}
        self.train_labels = base.labels(self._maps["train"][0])[self._maps["train"][1]]
        self.test_labels = base.labels(self._maps["test"][0])[self._maps["test"][1]]
        self._split = info

    def source(self, split: str, indices) -> tuple[str, np.ndarray]:
        """(base split, base indices) of this view's ``split`` rows at ``indices``."""
        idx = self._indices(split, indices)  # checks the split name too
        base_split, base_idx = self._maps[split]
        return base_split, base_idx[idx]

    def _raw(self, split: str, i: int):
        base_split, base_idx = self._maps[split]
        return self.base._raw(base_split, int(base_idx[i]))


class ImageFolderTask(_TaskBase):
    """An image folder (any fsspec URL): ``<root>/train/<class>/*`` with a test split in ``<root>/test`` (or
    ``val``, ``valid``, ``validation``: :data:`TEST_FOLDERS`); with ``<root>/train`` alone, or just
    ``<root>/<class>/*``, a stratified ``test_fraction`` of each class is held out as the test split (seeded by
    ``split_seed``, recorded in :meth:`split_info`). Class map = sorted class folders of the train split."""

    def __init__(self, root: str, name: str | None = None, storage_options: dict | None = None, *,
                 test_fraction: float = DEFAULT_TEST_FRACTION, split_seed: int = 0):
        self.root = root.rstrip("/")
        self.name = name or self.root.rsplit("/", 1)[-1]
        self.storage_options = storage_options
        fs, path = url_to_fs(self.root, storage_options)
        if not fs.isdir(path):
            raise FileNotFoundError(f"image folder not found: {self.root}")
        has_train = fs.isdir(path.rstrip("/") + "/train")
        test_dir = next((s for s in TEST_FOLDERS if fs.isdir(path.rstrip("/") + "/" + s)), None)
        if not has_train and test_dir is not None:
            raise FileNotFoundError(f"{self.name}: found {join_url(self.root, test_dir)} but no "
                                    f"{join_url(self.root, 'train')}")
        train_items = list_image_folder(self.root, "train" if has_train else None, storage_options)
        self.classes = sorted({it.labels[0] for it in train_items})
        index = {c: i for i, c in enumerate(self.classes)}
        if test_dir is not None:
            test_items = list_image_folder(self.root, test_dir, storage_options)
            unknown = sorted({it.labels[0] for it in test_items} - set(index))
            if unknown:
                raise ValueError(f"{self.name}: test classes missing from train: {unknown[:3]}")
            self._split = {"kind": "given", "test_source": test_dir}
        else:
            labels = np.array([index[it.labels[0]] for it in train_items], dtype=np.int64)
            kept, held = self._hold_out_test(labels, test_fraction, split_seed, "train" if has_train else "all")
            train_items, test_items = [train_items[i] for i in kept], [train_items[i] for i in held]
        self._urls = {"train": [it.url for it in train_items], "test": [it.url for it in test_items]}
        self.train_labels = np.array([index[it.labels[0]] for it in train_items], dtype=np.int64)
        self.test_labels = np.array([index[it.labels[0]] for it in test_items], dtype=np.int64)
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
        self._split = {"kind": "fixed", "method": "sklearn train_test_split(stratify, random_state=0)",
                       "seed": 0, "fraction": float(test_fraction), "held_out_digest": index_digest(idx_test)}

    def _raw(self, split: str, i: int) -> Image.Image:
        img = Image.fromarray(self._images[split][i], mode="L").resize((self.size, self.size), Image.BICUBIC)
        return img.convert("RGB")


class ShardSetTask(_TaskBase):
    """Train/test splits that were ingested as shard sets (two manifests), read by random access into the tars;
    with no test manifest, a stratified ``test_fraction`` of the train set is held out as the test split.

    Opening indexes each tar's members once (header scan, no image decoding); `load` then reads only the asked-for
    images with one ranged read each. Single-label shard sets only (few-shot probes need one class per image).
    """

    def __init__(self, train_manifest: str, test_manifest: str | None = None, name: str = "shards",
                 storage_options: dict | None = None, *, test_fraction: float = DEFAULT_TEST_FRACTION,
                 split_seed: int = 0):
        from .manifest import Manifest

        self.name, self.storage_options = name, storage_options
        mans = {"train": Manifest.load(train_manifest, storage_options)}
        if test_manifest is not None:
            mans["test"] = Manifest.load(test_manifest, storage_options)
        if any(m.multi_label for m in mans.values()):
            raise ValueError(f"{name}: few-shot / fine-tune tasks need single-label shard sets")
        self.classes = list(mans["train"].classes)
        index = {c: i for i, c in enumerate(self.classes)}
        self._where: dict[str, list[tuple[str, int, int]]] = {}
        labels: dict[str, np.ndarray] = {}
        for split, man in mans.items():
            self._where[split], labels[split] = self._scan(man, split, index)
        if test_manifest is None:
            kept, held = self._hold_out_test(labels["train"], test_fraction, split_seed, "train")
            rows = self._where["train"]
            self._where = {"train": [rows[i] for i in kept], "test": [rows[i] for i in held]}
            labels = {"train": labels["train"][kept], "test": labels["train"][held]}
        else:
            self._split = {"kind": "given", "test_source": str(test_manifest)}
        self.train_labels, self.test_labels = labels["train"], labels["test"]

    def _scan(self, man, split: str, index: dict[str, int]) -> tuple[list[tuple[str, int, int]], np.ndarray]:
        import tarfile

        rows, labs = [], []
        for shard in man.shards:
            url = man.url(shard)
            fs, path = url_to_fs(url, self.storage_options)
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
        return rows, np.array(labs, dtype=np.int64)

    def _raw(self, split: str, i: int) -> bytes:
        url, off, size = self._where[split][i]
        fs, path = url_to_fs(url, self.storage_options)
        with fs.open(path, "rb") as f:
            f.seek(off)
            return f.read(size)
