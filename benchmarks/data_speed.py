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
from vitpipe.pipeline.reader import parse_shard
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
        return torch.from_numpy(arr.copy()), self.labels[i]  # copy: flipped views have negative strides


def folder_loader(paths, labels, size, workers, batch, epochs) -> float:
    tf = ImageTransform(size, train=True)
    ds = FolderDataset(paths, labels, tf)

    def collate(items):
        return normalize_batch(torch.stack([x for x, _ in items]).numpy(), tf.mean, tf.std), \
            torch.tensor([y for _, y in items])

    dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                                     collate_fn=collate, persistent_workers=workers > 0)
    return _rate((x for _ in range(epochs) for x, _ in dl))


def _rate(batches) -> float:
    """img/s after the first batch (worker start-up is a one-off cost, not throughput)."""
    n, t0 = 0, None
    for x in batches:
        if t0 is None:
            t0 = time.perf_counter()
            continue
        n += len(x)
    return n / (time.perf_counter() - t0)


def stream_speed(url, size, workers, batch, epochs) -> float:
    cfg = StreamConfig(batch_size=batch, img_size=size, num_workers=workers, shuffle_buffer=2000)
    s = ShardStream(url, cfg, rank=0, world_size=1)
    rate = _rate((x for _ in range(epochs) for x, _ in s))
    s.close()
    return rate


def bench(name, src, split, limit, size, resize_short, batch, epochs, workers, rounds, tmp):
    cfg = IngestConfig(split=split, limit_per_class=limit, resize_short=resize_short, num_workers=workers,
                       shard_max_samples=1000 if resize_short is None else 64, max_bad_fraction=0.05)
    t0 = time.perf_counter()
    man = ingest(str(src), f"{tmp}/{name}", cfg)
    t_ingest = time.perf_counter() - t0
    # the same images, as files: what (a) and (b) read
    items = {it.key: it for it in list_image_folder(str(src), split)}
    paths, labels = [], []
    for s in man.shards:
        for key, _, label in parse_shard(open(man.url(s).replace("file://", ""), "rb").read(), set())[0]:
            paths.append(items[key].url)
            labels.append(label)
    best = {"a": 0.0, "b": 0.0, "stream": 0.0, "stream0": 0.0}
    for _ in range(rounds):  # interleaved rounds, best of each: robust to a busy shared machine
        best["a"] = max(best["a"], bare_loop(paths, size, len(paths) * epochs))
        best["b"] = max(best["b"], folder_loader(paths, labels, size, workers, batch, epochs))
        best["stream"] = max(best["stream"], stream_speed(f"{tmp}/{name}", size, workers, batch, epochs))
        best["stream0"] = max(best["stream0"], stream_speed(f"{tmp}/{name}", size, 0, batch, epochs))
    a, b, s, s0 = best["a"], best["b"], best["stream"], best["stream0"]
    print(f"\n== {name}: {man.num_samples} images -> {size}px, batch {batch}, {epochs} epoch(s) x best of {rounds}, "
          f"{workers} workers, load avg {os.getloadavg()[0]:.1f}")
    print(f"ingest                           : {man.num_samples / t_ingest:8.0f} img/s ({t_ingest:.1f}s, "
          f"resize_short={resize_short}, {len(man.shards)} shards, bad={man.bad})")
    print(f"(a) bare PIL loop, 1 process     : {a:8.0f} img/s")
    print(f"(b) folder DataLoader, {workers} workers: {b:8.0f} img/s")
    print(f"shard stream, in-process         : {s0:8.0f} img/s  ({s0 / a:.2f}x (a))")
    print(f"shard stream, {workers} workers         : {s:8.0f} img/s  ({s / workers / a:.2f}x (a) per core, "
          f"{s / b:.2f}x (b))")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cifar-per-class", type=int, default=500)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--photo-epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    print(f"CPU: {cpu_model()} x {os.cpu_count()} | torch {torch.__version__} | load avg {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        if (DATA / "cifar10" / "train").is_dir():
            bench("cifar10", DATA / "cifar10", "train", args.cifar_per_class, 32, None, 128, 2, args.workers,
                  args.rounds, tmp)
        if (DATA / "hymenoptera" / "train").is_dir():
            bench("hymenoptera", DATA / "hymenoptera", "train", None, 224, 256, 32, args.photo_epochs,
                  args.workers, args.rounds, tmp)


if __name__ == "__main__":
    main()
