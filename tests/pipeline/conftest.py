"""Fixtures for the data-layer tests: small synthetic image folders and ingested shard sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from needs import need_dir
from PIL import Image

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def jpeg_bytes(rng: np.random.Generator, w: int, h: int, quality: int = 90) -> bytes:
    """A random but compressible JPEG (smooth gradients + noise), so decode/resize act like on photos."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(2, 12) + yy * rng.uniform(2, 12)) % 256 for _ in range(3)], -1)
    arr = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def make_folder(root: Path, classes=("a", "b", "c"), per_class=20, size=(24, 20), seed=0) -> Path:
    """`root/<class>/<i>.jpg` with random JPEGs; returns root."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / c / f"img.{i:03d}.jpg").write_bytes(jpeg_bytes(rng, *size))
    return root


@pytest.fixture(name="make_folder", scope="session")
def make_folder_fixture():
    """The `make_folder(root, classes, per_class, size, seed)` helper (importlib mode: no conftest imports)."""
    return make_folder


@pytest.fixture(name="jpeg_bytes", scope="session")
def jpeg_bytes_fixture():
    """The `jpeg_bytes(rng, w, h, quality)` helper."""
    return jpeg_bytes


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> str:
    """A 3-class, 7-shard set of 150 small JPEGs (uneven last shard), ingested once per session."""
    from vitpipe.pipeline import IngestConfig, ingest

    base = tmp_path_factory.mktemp("small")
    src = make_folder(base / "src", per_class=50, size=(20, 16))
    dest = f"file://{base}/shards"
    ingest(str(src), dest, IngestConfig(shard_max_samples=22, num_workers=0))
    return dest


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    root = DATA / "cifar10"
    need_dir(root / "train", "CIFAR-10 JPEGs")
    return root


@pytest.fixture(scope="session")
def hymenoptera_dir() -> Path:
    root = DATA / "hymenoptera"
    need_dir(root / "train", "hymenoptera photos")
    return root
