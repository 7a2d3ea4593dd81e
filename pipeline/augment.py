"""Per-sample RandAugment (PIL) and the AugReg presets of RandAugment magnitude and Mixup alpha.

RandAugment follows big_vision `big_vision/pp/autoaugment.py` `distort_image_with_randaugment` (a fork of the
TensorFlow TPU `autoaugment.py`), the implementation the AugReg paper trained with:

- the 16 ops of its `available_ops`, in that order; each of the `num_ops` layers picks one uniformly and always
  applies it (the reference draws a probability per op but never uses it);
- its `level_to_arg` mapping with `_MAX_LEVEL = 10`: magnitude 10 gives the nominal maxima (rotate 30 degrees,
  shear 0.3, enhance factor 1.9, translate 100 px, cutout half-size 40 px) and larger magnitudes extrapolate
  linearly (AugReg uses 0, 10, 15 and 20). Rotate, shear and translate get a random sign. Posterize keeps
  int(level / 10 * 4) bits and Solarize inverts above int(level / 10 * 256): both get *weaker* as the magnitude
  grows (bits >= 8 and thresholds > 255 leave the image unchanged), as in the reference;
- geometric ops sample nearest-neighbour (the reference's default) and fill uncovered pixels with grey 128.

Where this differs from the reference, on purpose:
- pixel ops have PIL's semantics (`ImageEnhance`, and `ImageOps` re-done with numpy tables for speed), which the
  reference's TF ops say they are "equivalent of"; that also drops its Contrast bug (it blends with
  pixel-count / 256 instead of the mean grey level);
- the pixel constants (translate 100, cutout 40) are the reference's values at 224 px and scale with the image
  side, so 32 px CIFAR crops get the same relative strength (the reference's fixed 100 px would blank them);
- Posterize with 0 bits keeps 1 bit, which is what TF's clamped shift does (PIL would return black).

Randomness comes only from the per-sample RNG the transform passes in (`random()` in [0, 1)), so an image's
augmentation is a pure function of (seed, epoch, key) like its crop.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageEnhance

FILL = (128, 128, 128)
"""The grey the reference writes where geometric ops and Cutout leave no image."""
MAX_LEVEL = 10.0
"""The reference's `_MAX_LEVEL`: magnitude / MAX_LEVEL scales every op's nominal maximum."""
REF_SIDE = 224
"""Image side at which the reference's pixel constants (translate 100, cutout 40) apply unchanged."""
MAX_MAGNITUDE = 30
"""Largest accepted magnitude (a typo guard: at 30 shear is 0.9 and enhance factors reach 5.5)."""


# Ops take and return either a uint8 (H, W, 3) array or an RGB PIL image and convert only when they need the other.
# The table ops (AutoContrast, Equalize, Posterize, Solarize, SolarizeAdd) take statistics with PIL and build their
# tables with numpy: PIL's `ImageOps` builds them in Python loops, several times the cost of decoding a CIFAR-size
# image. Filters and resampling are PIL's.


def _pil(img) -> Image.Image:
    return img if isinstance(img, Image.Image) else Image.fromarray(np.ascontiguousarray(img))


def _arr(img) -> np.ndarray:
    return np.asarray(img)


def _pixels(img) -> int:
    return img.width * img.height if isinstance(img, Image.Image) else img.shape[0] * img.shape[1]


_RAMP = np.arange(256)
_BAND = np.arange(3) * 256  # offsets of the bands in a (3 * 256,) table
_SMALL = 96 * 96
"""Pixels up to which a numpy look-up beats `Image.point` (which rounds its 768 table entries in Python per call);
above, PIL's C loop is faster than numpy's fancy indexing. Both give the same pixels."""


def _lookup(img, table: np.ndarray):
    """Per-band look-up: `table` is (256,) for all bands or (3, 256), values in 0..255."""
    table = np.asarray(table, np.uint8)
    if _pixels(img) <= _SMALL:
        a = _arr(img)
        return table[a] if table.ndim == 1 else table.reshape(-1)[a + _BAND]
    return _pil(img).point(table.tolist() * 3 if table.ndim == 1 else table.reshape(-1).tolist())


def auto_contrast(img):
    """Per band, stretch [min, max] to [0, 255] (truncating); a flat band is left alone (`ImageOps.autocontrast`)."""
    lo, hi = np.asarray(_pil(img).getextrema(), np.float64).T
    scale = 255.0 / np.maximum(hi - lo, 1.0)
    table = np.where((hi > lo)[:, None], _RAMP * scale[:, None] - (lo * scale)[:, None], _RAMP)
    return _lookup(img, np.clip(table.astype(np.int64), 0, 255))


def equalize(img):
    """Per band histogram equalisation (`ImageOps.equalize`, which the reference re-implements in TF)."""
    tables = []
    for h in np.asarray(_pil(img).histogram(), np.int64).reshape(3, 256):
        nz = h[h > 0]
        step = (int(nz.sum()) - int(nz[-1])) // 255 if len(nz) > 1 else 0
        # lut[i] = (step // 2 + pixels below level i) // step
        tables.append(np.minimum(255, (step // 2 + np.cumsum(h) - h) // step) if step else _RAMP)
    return _lookup(img, np.stack(tables))


@lru_cache(maxsize=None)
def _table(kind: str, arg: int) -> np.ndarray:
    if kind == "posterize":
        t = _RAMP & (0xFF << (8 - arg)) & 0xFF
    elif kind == "solarize":
        t = np.where(_RAMP < arg, _RAMP, 255 - _RAMP)
    else:  # solarize_add, threshold 128
        t = np.where(_RAMP < 128, np.minimum(255, _RAMP + arg), _RAMP)
    t = t.astype(np.uint8)
    t.flags.writeable = False  # shared by every call (cached)
    return t


def invert(img) -> np.ndarray:
    return 255 - _arr(img)


def posterize(img, bits: int):
    """Keep the top `bits` bits (at least 1: TF's clamped shift; 8 or more: unchanged)."""
    return img if bits >= 8 else _lookup(img, _table("posterize", max(1, bits)))


def solarize(img, threshold: int):
    """Invert pixels >= threshold (threshold > 255: unchanged)."""
    return img if threshold > 255 else _lookup(img, _table("solarize", max(0, threshold)))


def solarize_add(img, addition: int):
    """Add `addition` (>= 0) to pixels below 128, clipped to 255."""
    return img if addition <= 0 else _lookup(img, _table("solarize_add", addition))


def cutout(img, cy: int, cx: int, pad: int):
    """Grey out rows [cy - pad, cy + pad) x columns [cx - pad, cx + pad), clipped to the image."""
    if pad <= 0:
        return img
    a = np.array(img)
    a[max(0, cy - pad) : cy + pad, max(0, cx - pad) : cx + pad] = FILL
    return a


def color(img, factor: float) -> Image.Image:
    return ImageEnhance.Color(_pil(img)).enhance(factor)


def contrast(img, factor: float) -> Image.Image:
    """`ImageEnhance.Contrast` (blend with the rounded mean grey level), its mean taken with numpy."""
    pil = _pil(img)
    mean = int(np.asarray(pil.convert("L")).mean() + 0.5)
    return Image.blend(Image.new("RGB", pil.size, (mean,) * 3), pil, factor)


def brightness(img, factor: float) -> Image.Image:
    return ImageEnhance.Brightness(_pil(img)).enhance(factor)


def sharpness(img, factor: float) -> Image.Image:
    return ImageEnhance.Sharpness(_pil(img)).enhance(factor)


def _affine(img, matrix: tuple[float, ...]) -> Image.Image:
    """PIL affine: output pixel (x, y) samples the input at matrix @ (x, y, 1) (pixel centres at +0.5)."""
    pil = _pil(img)
    return pil.transform(pil.size, Image.Transform.AFFINE, matrix, resample=Image.Resampling.NEAREST,
                         fillcolor=FILL)


def rotate(img, degrees: float) -> Image.Image:
    """Counter-clockwise about the image centre."""
    return _pil(img).rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=FILL)


def shear_x(img, level: float) -> Image.Image:
    """Output (x, y) samples input (x + level * y, y)."""
    return _affine(img, (1.0, level, 0.0, 0.0, 1.0, 0.0))


def shear_y(img, level: float) -> Image.Image:
    """Output (x, y) samples input (x, y + level * x)."""
    return _affine(img, (1.0, 0.0, 0.0, level, 1.0, 0.0))


def translate_x(img, pixels: float) -> Image.Image:
    """Output (x, y) samples input (x + pixels, y): the content moves left for pixels > 0."""
    return _affine(img, (1.0, 0.0, pixels, 0.0, 1.0, 0.0))


def translate_y(img, pixels: float) -> Image.Image:
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, pixels))


OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "Solarize": solarize, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x, "ShearY": shear_y,
    "TranslateX": translate_x, "TranslateY": translate_y, "Cutout": cutout, "SolarizeAdd": solarize_add,
}
"""The reference's `available_ops`, in its order (the op index drawn per layer indexes this order)."""
RANDAUG_OPS = tuple(OPS)


def _signed(value: float, rng) -> float:
    # the reference's `_randomly_negate_tensor`: keep the sign with probability 1/2
    return value if rng.random() < 0.5 else -value


def op_args(name: str, magnitude: float, size: tuple[int, int], rng) -> tuple:
    """The reference's `level_to_arg` for op `name` at `magnitude` on an image of `size` (w, h); random signs and
    the Cutout centre are drawn from `rng` (in this order: nothing, one sign draw, or cy then cx)."""
    level = magnitude / MAX_LEVEL
    w, h = size
    if name in ("AutoContrast", "Equalize", "Invert"):
        return ()
    if name == "Rotate":
        return (_signed(level * 30.0, rng),)
    if name == "Posterize":
        return (int(level * 4),)
    if name == "Solarize":
        return (int(level * 256),)
    if name == "SolarizeAdd":
        return (int(level * 110),)
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return (level * 1.8 + 0.1,)
    if name in ("ShearX", "ShearY"):
        return (_signed(level * 0.3, rng),)
    if name == "TranslateX":
        return (_signed(level * 100.0 * w / REF_SIDE, rng),)
    if name == "TranslateY":
        return (_signed(level * 100.0 * h / REF_SIDE, rng),)
    if name == "Cutout":
        pad = int(level * 40.0 * min(w, h) / REF_SIDE)
        cy = int(rng.random() * h)
        cx = int(rng.random() * w)
        return (cy, cx, pad)
    raise KeyError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """`num_ops` ops drawn uniformly from `RANDAUG_OPS`, each applied at `magnitude` (see the module docstring).

    Call with a uint8 (H, W, 3) array or an RGB PIL image and an RNG with `random()`; returns a uint8 array.
    `num_ops=0` returns the input unchanged and draws nothing."""

    def __init__(self, num_ops: int = 2, magnitude: int = 10):
        if num_ops < 0:
            raise ValueError(f"RandAugment.num_ops must be >= 0, got {num_ops}")
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"RandAugment.magnitude must be in [0, {MAX_MAGNITUDE}], got {magnitude}")
        self.num_ops, self.magnitude = int(num_ops), magnitude

    def draw(self, size: tuple[int, int], rng) -> list[tuple[str, tuple]]:
        """The (op name, args) of each layer for an image of `size` (w, h): per layer, the op index, then its
        random arguments."""
        ops = []
        for _ in range(self.num_ops):
            name = RANDAUG_OPS[min(int(rng.random() * len(RANDAUG_OPS)), len(RANDAUG_OPS) - 1)]
            ops.append((name, op_args(name, self.magnitude, size, rng)))
        return ops

    def __call__(self, img: np.ndarray | Image.Image, rng) -> np.ndarray:
        if isinstance(img, Image.Image) and img.mode != "RGB":
            img = img.convert("RGB")
        a = np.asarray(img)
        for name, args in self.draw((a.shape[1], a.shape[0]), rng):
            img = OPS[name](img, *args)
        return np.asarray(img)

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"


# ----- AugReg presets -----

@dataclass(frozen=True)
class AugRegPreset:
    """One AugReg augmentation setting: RandAugment (num_ops, magnitude) and the Mixup alpha (no CutMix)."""

    name: str
    randaug_num_ops: int
    randaug_magnitude: int
    mixup_alpha: float

    def stream_fields(self) -> dict:
        """The `StreamConfig` fields this preset sets."""
        return {"randaug_num_ops": self.randaug_num_ops, "randaug_magnitude": self.randaug_magnitude}

    def mix_fields(self) -> dict:
        """The `MixConfig` fields this preset sets (AugReg used Mixup only)."""
        return {"mixup_alpha": self.mixup_alpha, "cutmix_alpha": 0.0}


# From big_vision `big_vision/configs/vit_i21k.py` (RANDAUG_DEF and MIXUP_DEF, whose `p` is the Mixup Beta /
# Dirichlet concentration), the settings of Steiner et al. 2021, "How to train your ViT? Data, Augmentation, and
# Regularization in Vision Transformers" (AugReg, arXiv:2106.10270), section 3.3. `light1` is RandAugment(2, 0):
# not nothing (magnitude 0 still inverts, solarizes fully, posterizes to 1 bit, enhances with factor 0.1).
AUGREG_PRESETS: dict[str, AugRegPreset] = {
    p.name: p for p in (
        AugRegPreset(name="none", randaug_num_ops=0, randaug_magnitude=0, mixup_alpha=0.0),
        AugRegPreset(name="light1", randaug_num_ops=2, randaug_magnitude=0, mixup_alpha=0.0),
        AugRegPreset(name="light2", randaug_num_ops=2, randaug_magnitude=10, mixup_alpha=0.2),
        AugRegPreset(name="medium1", randaug_num_ops=2, randaug_magnitude=15, mixup_alpha=0.2),
        AugRegPreset(name="medium2", randaug_num_ops=2, randaug_magnitude=15, mixup_alpha=0.5),
        AugRegPreset(name="strong1", randaug_num_ops=2, randaug_magnitude=20, mixup_alpha=0.5),
        AugRegPreset(name="strong2", randaug_num_ops=2, randaug_magnitude=20, mixup_alpha=0.8),
    )
}


def augreg_preset(name: str) -> AugRegPreset:
    """The AugReg preset `name` (one of `AUGREG_PRESETS`)."""
    try:
        return AUGREG_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown AugReg preset {name!r}; choose one of {', '.join(AUGREG_PRESETS)}") from None
