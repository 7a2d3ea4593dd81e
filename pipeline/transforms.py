"""Decode + augment with PIL/numpy: Inception random-resized crop + flip [+ RandAugment] (train), resize + center
crop (eval).

JPEGs are decoded at reduced size (DCT scaling by 1/2, 1/4, 1/8) whenever the output needs no more pixels, which is
what makes photo-size streaming cheap. JPEG bytes are decoded with `simplejpeg` (libjpeg-turbo straight into a numpy
array) when it is installed: measured ~3x less CPU per CIFAR image than `PIL.Image.open` + load, whose marker
parsing is Python; other formats, CMYK JPEGs and anything simplejpeg rejects go through PIL (so a corrupt file still
raises PIL's error). Pixel work is uint8 per image; normalisation to float is done once per batch
(`normalize_batch`).
"""

from __future__ import annotations

import hashlib
import io
import math
import random

import numpy as np
import torch
from PIL import Image

from .augment import RandAugment
from .config import StreamConfig

try:
    import simplejpeg
except ImportError:  # optional: PIL decodes everything without it, only slower
    simplejpeg = None

Image.MAX_IMAGE_PIXELS = None  # real photos, not decompression bombs


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """The per-sample augmentation seed: a pure function of (seed, epoch, key)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


class SplitMix64:
    """A tiny deterministic PRNG (SplitMix64) with the `random()`/`uniform()` API the crops use.

    Seeding `random.Random` costs ~10 us per sample (Mersenne-Twister state init); this costs nothing, and its
    stream is fixed by the algorithm, not by a library version."""

    __slots__ = ("state",)
    _MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self._MASK

    def random(self) -> float:
        self.state = (self.state + 0x9E3779B97F4A7C15) & self._MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self._MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self._MASK
        return ((z ^ (z >> 31)) >> 11) * (1.0 / (1 << 53))

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()


def rrc_box(w: int, h: int, rng, scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[float, ...]:
    """Inception-style random crop box (x0, y0, x1, y1): area fraction in `scale`, log-uniform aspect in `ratio`,
    10 attempts then a center crop clamped to `ratio` (the torchvision/big_vision recipe)."""
    area = w * h
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(lr[0], lr[1]))
        cw = math.sqrt(target * ar)
        ch = math.sqrt(target / ar)
        if 0 < cw <= w and 0 < ch <= h:
            x0 = rng.uniform(0, w - cw)
            y0 = rng.uniform(0, h - ch)
            return (x0, y0, x0 + cw, y0 + ch)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, w / ratio[0]
    elif in_ratio > ratio[1]:
        cw, ch = h * ratio[1], h
    else:
        cw, ch = w, h
    x0, y0 = (w - cw) / 2, (h - ch) / 2
    return (x0, y0, x0 + cw, y0 + ch)


def center_box(w: int, h: int) -> tuple[float, ...]:
    """The central square: resizing it to img_size equals resize-short-side + center-crop."""
    s = min(w, h)
    x0, y0 = (w - s) / 2, (h - s) / 2
    return (x0, y0, x0 + s, y0 + s)


def open_image(data: bytes | Image.Image) -> Image.Image:
    return data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))


def crop_resize(img: Image.Image, box: tuple[float, ...], size: int) -> Image.Image:
    """Crop `box` (in full-resolution pixels) and resize to size x size, decoding JPEGs at reduced scale when the
    crop still has >= `size` pixels per side after DCT scaling."""
    w, h = img.size
    bw, bh = box[2] - box[0], box[3] - box[1]
    if img.format == "JPEG" and min(bw, bh) >= 2 * size and getattr(img, "tile", None):
        # only worth it when DCT scaling can at least halve the decode (skips the call for CIFAR-size images)
        # ask for a full image so large that the crop region keeps >= size pixels per side
        req = (max(1, math.ceil(w * size / bw)), max(1, math.ceil(h * size / bh)))
        img.draft("RGB", req)
        sx, sy = img.size[0] / w, img.size[1] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img.resize((size, size), Image.BILINEAR, box=box)


def _jpeg_header(data) -> tuple[int, int] | None:
    """(height, width) of JPEG bytes that simplejpeg can decode to RGB; None for anything else (PIL's job)."""
    if simplejpeg is None or isinstance(data, Image.Image) or bytes(data[:2]) != b"\xff\xd8":
        return None
    try:
        h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return None if colorspace == "CMYK" else (h, w)  # libjpeg-turbo has no CMYK -> RGB conversion


def _jpeg_crop_resize(data: bytes, w: int, h: int, box: tuple[float, ...], size: int) -> np.ndarray:
    """`crop_resize` for JPEG bytes through simplejpeg: the same reduced-size rule, the same PIL resampling."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    mw = mh = 0
    if min(bw, bh) >= 2 * size:
        # PIL's `draft` rule (a power-of-two scale keeping >= size pixels across the crop), so both paths give the
        # same pixels; libjpeg-turbo would otherwise also pick M/8 scales such as 3/8
        req_w, req_h = math.ceil(w * size / bw), math.ceil(h * size / bh)
        fit = min(w // req_w, h // req_h)
        scale = next((s for s in (8, 4, 2) if s <= fit), 1)
        mw, mh = -(-w // scale), -(-h // scale)
    # ISLOW DCT and fancy upsampling: PIL's defaults (simplejpeg's fast ones change pixels)
    arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, min_height=mh,
                                 min_width=mw)
    if arr.shape[0] != h or arr.shape[1] != w:
        sx, sy = arr.shape[1] / w, arr.shape[0] / h
        box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR, box=box))


def pad_crop(arr: np.ndarray, pad: int, rng) -> np.ndarray:
    """The CIFAR crop: (S, S, C) uint8 reflection-padded by `pad` (edge pixel not repeated, as ``np.pad``'s and
    ``torch.nn.functional.pad``'s "reflect"), then the S x S window at offsets drawn uniformly from 0..2*pad
    (row, then column)."""
    if pad == 0:
        return arr
    n = 2 * pad + 1
    i = min(int(rng.random() * n), n - 1)
    j = min(int(rng.random() * n), n - 1)
    h, w = arr.shape[:2]
    # the window's rows and columns in the unpadded image, reflected at the edges: no padded copy is made
    return arr[_reflect(np.arange(i - pad, i - pad + h), h)][:, _reflect(np.arange(j - pad, j - pad + w), w)]


def _reflect(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices outside 0..n-1 reflected back ("reflect" padding: the edge pixel is not repeated; |shift| < n)."""
    idx = np.abs(idx)
    return np.where(idx >= n, 2 * (n - 1) - idx, idx)


class ImageTransform:
    """PIL image or encoded bytes -> normalised float tensor (3, H, W).

    train=True: Inception random-resized crop (`scale`, `ratio`; or with crop="pad" the CIFAR crop, see `pad_crop`)
    + horizontal flip, then RandAugment when
    `randaug_num_ops` > 0 (big_vision's order); train=False: resize short side to `img_size` + center crop, never
    augmented. `rng` (a `random.Random`, numpy Generator or int seed) makes train crops reproducible; the stream
    passes one derived from (seed, epoch, key), and RandAugment continues drawing from it after the crop and flip.
    """

    def __init__(self, img_size: int = 224, train: bool = False, scale: tuple[float, float] = (0.35, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 mean: tuple[float, ...] = (0.5, 0.5, 0.5), std: tuple[float, ...] = (0.5, 0.5, 0.5),
                 randaug_num_ops: int = 0, randaug_magnitude: int = 0, crop: str = "rrc", pad_px: int = 4):
        if img_size < 1:
            raise ValueError(f"ImageTransform.img_size must be >= 1, got {img_size}")
        if crop not in ("rrc", "pad") or not 0 <= pad_px < img_size:
            raise ValueError(f"ImageTransform: crop must be 'rrc' or 'pad' and 0 <= pad_px < img_size, got "
                             f"{crop!r}, {pad_px}")
        self.crop, self.pad_px = crop, pad_px
        self.img_size, self.train, self.scale, self.ratio, self.hflip = img_size, train, scale, ratio, hflip
        self.mean, self.std = tuple(mean), tuple(std)
        randaug = RandAugment(randaug_num_ops, randaug_magnitude)  # validates even where it is not used
        self.randaug = randaug if train and randaug.num_ops > 0 else None

    @classmethod
    def from_config(cls, cfg: StreamConfig) -> "ImageTransform":
        """The per-sample transform a stream with `cfg` applies."""
        return cls(cfg.img_size, cfg.train, cfg.rrc_scale, cfg.rrc_ratio, cfg.hflip, cfg.mean, cfg.std,
                   randaug_num_ops=cfg.randaug_num_ops, randaug_magnitude=cfg.randaug_magnitude, crop=cfg.crop,
                   pad_px=cfg.pad_px)

    def to_uint8(self, data: bytes | Image.Image, rng=None) -> np.ndarray:
        """(H, W, 3) uint8 after crop/resize/flip [/RandAugment]; raises PIL/OSError errors on corrupt data."""
        if self.train:
            rng = _as_rng(rng)
        header = _jpeg_header(data)
        img = None
        if header is None:
            img = open_image(data)
            w, h = img.size
        else:
            h, w = header
        box, flip = self._box(w, h, rng)
        arr = None
        if header is not None:
            try:
                arr = _jpeg_crop_resize(data, w, h, box, self.img_size)
            except ValueError:  # corrupt or unsupported: PIL decides (and names the error)
                img = open_image(data)
        if arr is None:
            arr = np.asarray(crop_resize(img, box, self.img_size))
        if self.train and self.crop == "pad":
            arr = pad_crop(arr, self.pad_px, rng)
            flip = self.hflip and rng.random() < 0.5  # drawn after the offsets (the crop box drew nothing)
        arr = arr[:, ::-1] if flip else arr
        return arr if self.randaug is None else self.randaug(arr, rng)

    def _box(self, w: int, h: int, rng) -> tuple[tuple[float, ...], bool]:
        if not self.train or self.crop == "pad":  # the pad crop starts from the eval view
            return center_box(w, h), False
        box = rrc_box(w, h, rng, self.scale, self.ratio)
        return box, self.hflip and rng.random() < 0.5

    def __call__(self, data: bytes | Image.Image, rng=None) -> torch.Tensor:
        return normalize_batch(self.to_uint8(data, rng)[None], self.mean, self.std)[0]

    def __repr__(self) -> str:
        return (f"ImageTransform(img_size={self.img_size}, train={self.train}, crop={self.crop!r}, scale={self.scale}, "
                f"hflip={self.hflip}"
                f"{'' if self.randaug is None else ', ' + repr(self.randaug)})")


def _as_rng(rng):
    """The train RNG: a fresh `random.Random` for None, a `SplitMix64` for an int seed, else `rng` itself."""
    if rng is None:
        return random.Random()
    return SplitMix64(rng) if isinstance(rng, int) else rng


def normalize_batch(batch: np.ndarray, mean, std, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 of (x/255 - mean) / std (into `out` when given).

    numpy, single-threaded on purpose: torch's intra-op threads on tiny tensors contend with the trainer and the
    loader workers (measured 30x slower on a busy 2-core machine)."""
    src = np.asarray(batch).transpose(0, 3, 1, 2)
    dst = np.empty(src.shape, np.float32) if out is None else out.numpy()
    np.multiply(src, np.array([1.0 / (255.0 * s) for s in std], np.float32).reshape(1, 3, 1, 1), out=dst)
    dst -= np.array([m / s for m, s in zip(mean, std)], np.float32).reshape(1, 3, 1, 1)
    return torch.from_numpy(dst) if out is None else out
