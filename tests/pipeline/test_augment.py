"""RandAugment ops against independent numpy references, its magnitude mapping, determinism through the transform
and the stream (ranks, workers, resume), and the AugReg presets."""

from __future__ import annotations

import io
import json
import math

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from vitpipe.pipeline import (AUGREG_PRESETS, ImageTransform, MixConfig, RandAugment, ShardStream, StreamConfig,
                              augreg_preset)
from vitpipe.pipeline import augment as A
from vitpipe.pipeline.transforms import SplitMix64, sample_seed


@pytest.fixture(scope="module", params=[(29, 37), (101, 117)], ids=["small", "large"])
def arr(request) -> np.ndarray:
    """Odd, non-square (catches x/y mix-ups); "large" is above `A._SMALL`, where table ops take PIL's path."""
    a = np.random.default_rng(1).integers(20, 230, (*request.param, 3), dtype=np.uint8)
    a[..., 2] = 77  # a flat channel: AutoContrast and Equalize must leave it alone
    return a


# ----- independent references (the reference's definitions in numpy; no PIL) -----

def nearest(a: np.ndarray, fx, fy) -> tuple[np.ndarray, np.ndarray]:
    """Output (x, y) = input at (fx, fy)(pixel centre), nearest neighbour, grey 128 outside the image; and the mask
    of pixels whose source lies > 0.01 px from a pixel edge (PIL steps affine maps in 16.16 fixed point, which can
    round a source within ~1e-3 px of an edge to the neighbour)."""
    h, w = a.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    sx, sy = np.broadcast_to(fx(xs, ys), xs.shape), np.broadcast_to(fy(xs, ys), xs.shape)
    xi, yi = np.floor(sx).astype(int), np.floor(sy).astype(int)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.full_like(a, 128)
    out[ok] = a[yi[ok], xi[ok]]
    sure = (np.abs(sx - np.round(sx)) > 0.01) & (np.abs(sy - np.round(sy)) > 0.01)
    return out, sure


def same_where_sure(got, ref_sure) -> bool:
    ref, sure = ref_sure
    assert sure.mean() > 0.9
    return np.array_equal(got[sure], ref[sure])


def blend(degenerate, a, factor) -> np.ndarray:
    """The reference's `blend`: float32 degenerate + factor * (image - degenerate), clipped, truncated to uint8."""
    t = np.float32(degenerate) + np.float32(factor) * (a.astype(np.float32) - np.float32(degenerate))
    return np.clip(t, 0, 255).astype(np.uint8)


def grey(a) -> np.ndarray:
    """ITU-R 601 luma in 16-bit fixed point (PIL's "L")."""
    r, g, b = (a[..., i].astype(np.int64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def autocontrast_ref(a):
    out = a.copy()
    for c in range(3):
        lo, hi = float(a[..., c].min()), float(a[..., c].max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            out[..., c] = np.clip(a[..., c] * scale - lo * scale, 0, 255).astype(np.uint8)
    return out


def equalize_ref(a):
    out = a.copy()
    for c in range(3):
        hist = np.bincount(a[..., c].ravel(), minlength=256)
        step = (hist.sum() - hist[np.flatnonzero(hist)[-1]]) // 255
        if step:
            lut = np.concatenate([[0], (np.cumsum(hist) + step // 2) // step])[:256]
            out[..., c] = np.clip(lut, 0, 255)[a[..., c]]
    return out


def smooth_ref(a):
    """PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border pixels keep the original."""
    k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64) / 13
    h, w = a.shape[:2]
    d = a.copy()
    d[1:-1, 1:-1] = np.floor(sum(k[i, j] * a[i:i + h - 2, j:j + w - 2] for i in range(3) for j in range(3)) + 0.5)
    return d


def run_op(name, a, *args) -> np.ndarray:
    """The op on a PIL image and on the array (ops take either): both must agree."""
    out = np.asarray(A.OPS[name](Image.fromarray(a), *args))
    assert np.array_equal(np.asarray(A.OPS[name](a.copy(), *args)), out), name
    return out


@pytest.mark.parametrize("name,level", [("ShearX", 0.3), ("ShearX", -0.45), ("ShearY", 0.3), ("ShearY", -0.9)])
def test_shear_matches_definition(arr, name, level):
    if name == "ShearX":
        ref = nearest(arr, lambda x, y: x + level * y, lambda x, y: y)
    else:
        ref = nearest(arr, lambda x, y: x, lambda x, y: y + level * x)
    assert same_where_sure(run_op(name, arr, level), ref)


@pytest.mark.parametrize("pixels", [5.0, -7.3, 16.07, 100.0])
def test_translate_matches_definition(arr, pixels):
    assert same_where_sure(run_op("TranslateX", arr, pixels), nearest(arr, lambda x, y: x + pixels, lambda x, y: y))
    assert same_where_sure(run_op("TranslateY", arr, pixels), nearest(arr, lambda x, y: x, lambda x, y: y + pixels))
    if pixels > 0:  # the content moves left / up
        assert np.array_equal(run_op("TranslateX", arr, 5.0)[:, :-5], arr[:, 5:])


@pytest.mark.parametrize("degrees", [30.0, -45.0, 13.7])
def test_rotate_is_counter_clockwise_about_the_centre(arr, degrees):
    h, w = arr.shape[:2]
    t, cx, cy = math.radians(degrees), w / 2, h / 2
    ref = nearest(arr, lambda x, y: cx + math.cos(t) * (x - cx) - math.sin(t) * (y - cy),
                  lambda x, y: cy + math.sin(t) * (x - cx) + math.cos(t) * (y - cy))
    assert same_where_sure(run_op("Rotate", arr, degrees), ref)


def test_table_ops_equal_pil_imageops(arr, jpeg_bytes):
    """The numpy-table ops give PIL ImageOps' (and ImageEnhance.Contrast's) pixels, also on a photo-like image and a
    flat one."""
    from PIL import ImageEnhance, ImageOps

    photo = np.asarray(Image.open(io.BytesIO(jpeg_bytes(np.random.default_rng(2), 48, 40))))
    big = np.asarray(Image.open(io.BytesIO(jpeg_bytes(np.random.default_rng(3), 130, 100))))  # > A._SMALL pixels
    assert big.shape[0] * big.shape[1] > A._SMALL >= photo.shape[0] * photo.shape[1]
    for a in (arr, photo, big, np.full((5, 7, 3), 9, np.uint8)):
        img = Image.fromarray(a)
        assert np.array_equal(run_op("AutoContrast", a), np.asarray(ImageOps.autocontrast(img)))
        assert np.array_equal(run_op("Equalize", a), np.asarray(ImageOps.equalize(img)))
        assert np.array_equal(run_op("Invert", a), np.asarray(ImageOps.invert(img)))
        for bits in range(1, 8):
            assert np.array_equal(run_op("Posterize", a, bits), np.asarray(ImageOps.posterize(img, bits)))
        for t in (0, 1, 128, 255, 256):
            assert np.array_equal(run_op("Solarize", a, t), np.asarray(ImageOps.solarize(img, t)))
        for f in (0.1, 1.9, 2.8):
            assert np.array_equal(run_op("Contrast", a, f), np.asarray(ImageEnhance.Contrast(img).enhance(f)))


def test_pixel_ops_match_definitions(arr):
    a = arr
    assert np.array_equal(run_op("AutoContrast", a), autocontrast_ref(a))
    assert np.array_equal(run_op("Equalize", a), equalize_ref(a))
    assert np.array_equal(run_op("Invert", a), 255 - a)
    for bits, keep in ((0, 0x80), (1, 0x80), (4, 0xF0), (6, 0xFC), (8, 0xFF), (9, 0xFF)):  # 0 bits: TF's clamp
        assert np.array_equal(run_op("Posterize", a, bits), a & keep), bits
    for t in (0, 128, 200, 384):
        assert np.array_equal(run_op("Solarize", a, t), np.where(a < t, a, 255 - a)), t
    for add in (0, 55, 165):
        ref = np.where(a < 128, np.minimum(255, a.astype(int) + add), a)
        assert np.array_equal(run_op("SolarizeAdd", a, add), ref), add
    for f in (0.1, 0.73, 1.9, 2.8, 3.7):
        assert np.array_equal(run_op("Brightness", a, f), blend(0, a, f)), f
        assert np.array_equal(run_op("Color", a, f), blend(np.repeat(grey(a)[..., None], 3, -1), a, f)), f
        assert np.array_equal(run_op("Contrast", a, f), blend(int(grey(a).mean() + 0.5), a, f)), f
        assert np.array_equal(run_op("Sharpness", a, f), blend(smooth_ref(a), a, f)), f


def test_cutout_greys_the_clipped_square(arr):
    w = arr.shape[1]
    out = run_op("Cutout", arr, 3, w - 2, 5)
    mask = np.zeros(arr.shape[:2], bool)
    mask[0:8, w - 7 :] = True  # rows 3-5 .. 3+5 and columns w-2-5 .. w-2+5, clipped to the image
    assert (out[mask] == 128).all() and np.array_equal(out[~mask], arr[~mask])
    assert np.array_equal(run_op("Cutout", arr, 10, 10, 0), arr)


class Fixed:
    """An RNG returning the given values in turn."""

    def __init__(self, *values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_magnitude_to_argument_mapping():
    """big_vision's level_to_arg (_MAX_LEVEL 10); pixel constants at 224 px, scaled with the side elsewhere."""
    def args(name, m, size=(224, 224), *draws):
        return A.op_args(name, m, size, Fixed(*draws))

    assert args("Rotate", 10, (224, 224), 0.2) == (30.0,) and args("Rotate", 15, (224, 224), 0.7) == (-45.0,)
    assert args("ShearX", 20, (224, 224), 0.1) == pytest.approx((0.6,))
    assert args("ShearY", 15, (224, 224), 0.9) == pytest.approx((-0.45,))
    assert args("TranslateX", 10, (224, 224), 0.0) == (100.0,)
    assert args("TranslateY", 15, (32, 224), 0.99) == (-150.0,)  # y uses the height
    assert args("TranslateX", 15, (32, 32), 0.3) == pytest.approx((150.0 * 32 / 224,))
    for name in ("Color", "Contrast", "Brightness", "Sharpness"):
        assert args(name, 0) == pytest.approx((0.1,)) and args(name, 15) == pytest.approx((2.8,))
    assert [args("Posterize", m)[0] for m in (0, 5, 10, 15, 20)] == [0, 2, 4, 6, 8]
    assert [args("Solarize", m)[0] for m in (0, 5, 10, 15)] == [0, 128, 256, 384]
    assert [args("SolarizeAdd", m)[0] for m in (0, 10, 15)] == [0, 110, 165]
    assert args("Cutout", 10, (224, 224), 0.5, 0.25) == (112, 56, 40)
    assert args("Cutout", 15, (32, 48), 0.999, 0.0) == (47, 0, int(1.5 * 40 * 32 / 224))  # (cy, cx, pad)
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert args(name, 20) == ()
    assert A.RANDAUG_OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
                             "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
                             "Cutout", "SolarizeAdd")


def test_randaugment_draws_and_applies_in_order(arr):
    ra = RandAugment(2, 15)
    # layer 1: u=0.69 -> op 11 (ShearY), sign draw 0.2 keeps +0.45; layer 2: u=0.34 -> op 5 (Solarize), no draws
    rng = Fixed(11.02 / 16, 0.2, 5.5 / 16)
    assert ra.draw((37, 29), Fixed(11.02 / 16, 0.2, 5.5 / 16)) == [("ShearY", (0.3 * 1.5,)), ("Solarize", (384,))]
    want = run_op("Solarize", run_op("ShearY", arr, 1.5 * 0.3), 384)
    assert np.array_equal(ra(arr, rng), want) and rng.values == []
    assert np.array_equal(RandAugment(0, 30)(arr, Fixed()), arr)  # no ops: no draws, no change
    names = {n for s in range(200) for n, _ in RandAugment(2, 10).draw((32, 32), SplitMix64(s))}
    assert names == set(A.RANDAUG_OPS)
    with pytest.raises(ValueError, match=r"RandAugment.magnitude must be in \[0, 30\], got 31"):
        RandAugment(2, 31)
    with pytest.raises(ValueError, match="RandAugment.num_ops must be >= 0, got -1"):
        RandAugment(-1, 10)


def test_transform_applies_randaugment_after_crop_and_flip(jpeg_bytes):
    datas = [jpeg_bytes(np.random.default_rng(i), 40, 30) for i in range(12)]
    plain = ImageTransform(img_size=16, train=True)
    aug = ImageTransform(img_size=16, train=True, randaug_num_ops=2, randaug_magnitude=15)
    changed = 0
    for i, d in enumerate(datas):
        rng = SplitMix64(i)
        base = plain.to_uint8(d, rng)  # the crop + flip draws ...
        want = RandAugment(2, 15)(base, rng)  # ... then RandAugment continues the same stream
        got = aug.to_uint8(d, SplitMix64(i))
        assert np.array_equal(got, want) and np.array_equal(got, aug.to_uint8(d, SplitMix64(i)))
        changed += not np.array_equal(got, base)
    assert changed >= 10
    # off: the plain path, and the RNG is left exactly where the crop + flip leave it
    off = ImageTransform(img_size=16, train=True, randaug_num_ops=0, randaug_magnitude=20)
    r1, r2 = SplitMix64(3), SplitMix64(3)
    assert off.randaug is None and np.array_equal(off.to_uint8(datas[0], r1), plain.to_uint8(datas[0], r2))
    assert r1.state == r2.state
    # eval never augments, whatever the settings
    ev = ImageTransform(img_size=16, train=False, randaug_num_ops=2, randaug_magnitude=20)
    assert ev.randaug is None and np.array_equal(ev.to_uint8(datas[0]), ImageTransform(16).to_uint8(datas[0]))


def scfg(**kw) -> StreamConfig:
    base = dict(batch_size=8, img_size=16, shuffle_buffer=30, num_workers=0, randaug_num_ops=2, randaug_magnitude=15)
    return StreamConfig(**{**base, **kw})


def by_key(stream, n=None) -> dict:
    out = {}
    for i, (x, _, keys) in enumerate(stream.iter_batches()):
        out.update({k: x[j] for j, k in enumerate(keys)})
        if n is not None and i + 1 == n:
            break
    return out


def test_stream_randaugment_is_a_function_of_seed_epoch_key(small_shards):
    ref = by_key(ShardStream(small_shards, scfg(), rank=0, world_size=1))
    plain = by_key(ShardStream(small_shards, scfg(randaug_num_ops=0), rank=0, world_size=1))
    assert sum(not torch.equal(ref[k], plain[k]) for k in ref) > len(ref) // 2
    # another world size, rank and loader-worker count: the same key gets the same pixels
    for r in range(2):
        other = by_key(ShardStream(small_shards, scfg(num_workers=2, batch_size=5), rank=r, world_size=2))
        assert other and all(torch.equal(ref[k], v) for k, v in other.items() if k in ref)
    # resume mid-epoch with loader workers: the rest of the epoch is identical
    s = ShardStream(small_shards, scfg(num_workers=2), rank=0, world_size=1)
    head = by_key(s, 3)
    s2 = ShardStream(small_shards, scfg(num_workers=2), rank=0, world_size=1)
    s2.load_state_dict(json.loads(json.dumps(s.state_dict())))
    tail = by_key(s2)
    assert set(head) | set(tail) == set(ref) and all(torch.equal(ref[k], v) for k, v in {**head, **tail}.items())
    # the next epoch augments the same key differently
    s3 = ShardStream(small_shards, scfg(), rank=0, world_size=1)
    s3.set_epoch(1)
    e1 = by_key(s3)
    both = set(ref) & set(e1)  # drop_last drops other samples in epoch 1
    assert len(both) > 100 and sum(not torch.equal(ref[k], e1[k]) for k in both) > len(both) // 2


def test_stream_pixels_equal_the_per_sample_transform(small_shards):
    """The stream's image for a key is the transform's output under sample_seed(seed, epoch, key)."""
    from vitpipe.pipeline import Manifest
    from vitpipe.pipeline.tars import parse_shard

    m = Manifest.load(small_shards)
    raw = {}
    for shard in m.shards:
        with fsspec.open(m.url(shard), "rb") as f:
            raw.update({k: d for k, d, _ in parse_shard(f.read(), set())[0]})
    c = scfg(seed=4)
    tf = ImageTransform(16, train=True, randaug_num_ops=2, randaug_magnitude=15)
    x, _, keys = next(ShardStream(small_shards, c).iter_batches())
    for img, k in zip(x, keys):
        want = tf(raw[k], SplitMix64(sample_seed(4, 0, k)))
        assert torch.equal(img, want), k


def test_augreg_presets_table():
    """big_vision configs/vit_i21k.py RANDAUG_DEF / MIXUP_DEF."""
    table = {n: (p.randaug_num_ops, p.randaug_magnitude, p.mixup_alpha) for n, p in AUGREG_PRESETS.items()}
    assert table == {"none": (0, 0, 0.0), "light1": (2, 0, 0.0), "light2": (2, 10, 0.2), "medium1": (2, 15, 0.2),
                     "medium2": (2, 15, 0.5), "strong1": (2, 20, 0.5), "strong2": (2, 20, 0.8)}
    p = augreg_preset("medium2")
    c = StreamConfig(**p.stream_fields())
    mix = MixConfig(**p.mix_fields())
    assert (c.randaug_num_ops, c.randaug_magnitude, mix.mixup_alpha, mix.cutmix_alpha) == (2, 15, 0.5, 0.0)
    with pytest.raises(ValueError, match="unknown AugReg preset 'heavy'; choose one of none, light1, light2"):
        augreg_preset("heavy")


def test_stream_config_randaug_validation():
    with pytest.raises(ValueError, match="StreamConfig.randaug_num_ops must be >= 0, got -2"):
        StreamConfig(randaug_num_ops=-2)
    with pytest.raises(ValueError, match=r"StreamConfig.randaug_magnitude must be in \[0, 30\], got 45"):
        StreamConfig(randaug_magnitude=45)
