"""Images/s of the shard stream vs (a) a bare PIL decode+crop loop and (b) a folder-of-JPEGs DataLoader.

    python benchmarks/data_speed.py [--cifar-images 10000] [--workers 2]

Both at CIFAR size (32 px, ../shared/data/cifar10) and photo size (224 px, ../shared/data/hymenoptera: 396
photos up to 2592x1984, ingested with resize_short=256). All numbers come from this one run on this machine;
the ratios are what matter. Targets (issue 4): stream >= 0.9x (a) per core; >= 1.5x (b) at photo size and
>= 1.2x (b) at CIFAR size.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vitpipe.pipeline import ImageTransform, IngestConfig, ShardStream, StreamConfig, ingest
from vitpipe.pipeline.sources import list_image_folder
from vitpipe.pipeline.transforms import SplitMix64, normalize_batch, rrc_box

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def bare_loop(paths: list[str], size: int, n: int) -> float:
    """(a) one process, no framework: open, decode, random-resized crop + resize, flip, to array. img/s."""
    rng = SplitMix64(0)
    t0 = time.perf_counter()
    for i in range(n):
        img = Image.open(paths[i % len(paths)]).convert("RGB")
        box = rrc_box(img.width, img.height, rng, (0.35, 1.0), (3 / 4, 4 / 3))
        arr = np.asarray(img.resize((size, size), Image.BILINEAR, box=box))
        if rng.random() < 0.5:
            arr = arr[:, ::-1]
    return n / (time.perf_counter() - t0)


class FolderDataset(torch.utils.data.Dataset):
    """(b) the classic map-style dataset over JPEG files with the same transform as the stream."""

    def __init__(self, paths, labels, tf):
        self.paths, self.labels, self.tf = paths, labels, tf

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], "rb") as f:
            arr = self.tf.to_uint8(f.read(), SplitMix64(i))
        return torch.from_numpy(np.ascontiguousarray(arr)), self.labels[i]


def folder_loader(paths, labels, size, workers, batch, epochs) -> float:
    tf = ImageTransform(size, train=True)
    ds = FolderDataset(paths, labels, tf)

    def collate(items):
        return normalize_batch(torch.stack([x for x, _ in items]).numpy(), tf.mean, tf.std), \
            torch.tensor([y for _, y in items])

    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     collate_fn=collate, persistent_workers=workers > 0)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in dl:
            n += len(x)
    return n / (time.perf_counter() - t0)


def stream_speed(url, size, workers, batch, epochs) -> float:
    cfg = StreamConfig(batch_size=batch, img_size=size, num_workers=workers, shuffle_buffer=2000)
    s = ShardStream(url, cfg, rank=0, world_size=1)
    n, t0 = 0, time.perf_counter()
    for _ in range(epochs):
        for x, _ in s:
            n += len(x)
    return n / (time.perf_counter() - t0)


def bench(name, src, split, limit, size, resize_short, batch, epochs, workers, tmp):
    cfg = IngestConfig(split=split, limit_per_class=limit, resize_short=resize_short, num_workers=workers,
                       shard_max_samples=1000, max_bad_fraction=0.05)
    items = [it for it in list_image_folder(str(src), split) if it.ext in ("jpg", "jpeg")]
    if limit:
        per, kept = {}, []
        for it in items:
            if per.get(it.labels[0], 0) < limit:
                per[it.labels[0]] = per.get(it.labels[0], 0) + 1
                kept.append(it)
        items = kept
    paths = [it.url for it in items]
    labels = sorted({it.labels[0] for it in items})
    y = [labels.index(it.labels[0]) for it in items]
    t0 = time.perf_counter()
    man = ingest(str(src), f"{tmp}/{name}", cfg)
    t_ingest = time.perf_counter() - t0
    n_a = len(paths) * epochs
    a = bare_loop(paths, size, n_a)
    b = folder_loader(paths, y, size, workers, batch, epochs)
    s = stream_speed(f"{tmp}/{name}", size, workers, batch, epochs)
    s0 = stream_speed(f"{tmp}/{name}", size, 0, batch, epochs)
    print(f"\n== {name}: {man.num_samples} images -> {size}px, batch {batch}, {epochs} epoch(s), {workers} workers")
    print(f"ingest                          : {man.num_samples / t_ingest:8.0f} img/s ({t_ingest:.1f}s, "
          f"resize_short={resize_short}, {len(man.shards)} shards, bad={man.bad})")
    print(f"(a) bare PIL loop, 1 process    : {a:8.0f} img/s")
    print(f"(b) folder DataLoader, {workers} workers: {b:8.0f} img/s")
    print(f"shard stream, in-process        : {s0:8.0f} img/s  ({s0 / a:.2f}x (a))")
    print(f"shard stream, {workers} workers        : {s:8.0f} img/s  ({s / workers / a:.2f}x (a) per core, "
          f"{s / b:.2f}x (b))")
    return {"a": a, "b": b, "stream": s, "stream0": s0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar-per-class", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--photo-epochs", type=int, default=3)
    args = p.parse_args()
    print(f"CPU: {cpu_model()} x {os.cpu_count()} | torch {torch.__version__} | load avg {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if (DATA / "cifar10" / "train").is_dir():
            bench("cifar10", DATA / "cifar10", "train", args.cifar_per_class, 32, None, 128, 1, args.workers, tmp)
        if (DATA / "hymenoptera" / "train").is_dir():
            for split in ("train", "test"):
                pass
            bench("hymenoptera", DATA / "hymenoptera", "train", None, 224, 256, 32, args.photo_epochs,
                  args.workers, tmp)


if __name__ == "__main__":
    main()
