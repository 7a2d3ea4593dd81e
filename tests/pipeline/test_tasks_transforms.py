"""Downstream tasks (lazy loading, fixed splits) and the decode/augment transforms."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitpipe.pipeline import DigitsTask, ImageFolderTask, ImageTransform
from vitpipe.pipeline.transforms import SplitMix64, crop_resize, rrc_box


def test_digits_task_fixed_split():
    a, b = DigitsTask(), DigitsTask()
    assert a.num_train + a.num_test == 1797 and a.num_test == 540
    assert np.array_equal(a.test_labels, b.test_labels) and set(a.train_labels.tolist()) == set(range(10))
    imgs = a.load("test", [0, 5])
    assert len(imgs) == 2 and imgs[0].size == (32, 32) and imgs[0].mode == "RGB"
    x, y = next(a.batches("test", None, ImageTransform(img_size=24), batch_size=100))
    assert x.shape == (100, 3, 24, 24) and torch.equal(y, torch.as_tensor(a.test_labels[:100]))
    with pytest.raises(ValueError, match="indices"):
        a.load("train", [a.num_train])
    with pytest.raises(ValueError, match="split"):
        a.load("val", [0])


def test_image_folder_task_loads_only_requested(cifar_dir, monkeypatch):
    t = ImageFolderTask(str(cifar_dir))
    assert (t.num_train, t.num_test, len(t.classes)) == (50000, 10000, 10)
    reads = []
    orig = t._raw
    monkeypatch.setattr(t, "_raw", lambda split, i: reads.append((split, i)) or orig(split, i))
    shots = np.array([3, 17, 40001])
    imgs = t.load("train", shots)
    assert reads == [("train", 3), ("train", 17), ("train", 40001)] and imgs[0].size == (32, 32)
    batches = list(t.batches("test", np.arange(10), ImageTransform(img_size=48), batch_size=4))
    assert [len(y) for _, y in batches] == [4, 4, 2] and batches[0][0].shape == (4, 3, 48, 48)
    assert torch.equal(torch.cat([y for _, y in batches]), torch.as_tensor(t.test_labels[:10]))


def test_eval_transform_is_resize_short_then_center_crop(hymenoptera_dir):
    path = sorted((hymenoptera_dir / "train" / "ants").glob("*.jpg"))[0]
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 64 / min(w, h)
    ref = img.resize((round(w * s), round(h * s)), Image.BILINEAR)
    l, t = (ref.width - 64) // 2, (ref.height - 64) // 2
    ref = np.asarray(ref.crop((l, t, l + 64, t + 64)), dtype=np.float32)
    got = ImageTransform(img_size=64).to_uint8(path.read_bytes()).astype(np.float32)
    # reduced-size JPEG decode + single-step resize vs full decode + resize: same picture, small pixel error
    assert got.shape == (64, 64, 3) and np.abs(got - ref).mean() < 6


def test_draft_decode_matches_full_decode_on_photos(hymenoptera_dir):
    path = max((hymenoptera_dir / "train" / "bees").glob("*.jpg"), key=lambda p: p.stat().st_size)
    data = path.read_bytes()
    full = Image.open(io.BytesIO(data)).convert("RGB")
    box = (10.0, 20.0, full.width - 30.0, full.height - 5.0)
    fast = np.asarray(crop_resize(Image.open(io.BytesIO(data)), box, 96), dtype=np.float32)
    slow = np.asarray(full.resize((96, 96), Image.BILINEAR, box=box), dtype=np.float32)
    psnr = 10 * np.log10(255**2 / np.mean((fast - slow) ** 2))
    assert psnr > 28


@pytest.mark.parametrize("w,h", [(32, 32), (500, 375), (40, 400)])
def test_rrc_box_inside_image_with_area_and_ratio(w, h):
    rng = SplitMix64(123)
    areas = []
    for _ in range(500):
        x0, y0, x1, y1 = rrc_box(w, h, rng, (0.35, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= w + 1e-9 and 0 <= y0 < y1 <= h + 1e-9
        areas.append((x1 - x0) * (y1 - y0) / (w * h))
    if w == h:
        assert 0.35 - 1e-9 <= min(areas) and max(areas) <= 1 + 1e-9 and np.std(areas) > 0.1


def test_train_transform_reproducible_and_flips(jpeg_bytes):
    data = jpeg_bytes(np.random.default_rng(0), 40, 30)
    tf = ImageTransform(img_size=16, train=True, scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    assert torch.equal(tf(data, rng=5), tf(data, rng=5))
    outs = {tuple(tf(data, rng=s).flatten()[:8].tolist()) for s in range(20)}
    assert len(outs) == 2  # full-image crop: only the flip varies


def test_simplejpeg_path_matches_pil_and_rejects_corrupt_data(cifar_dir, hymenoptera_dir, monkeypatch):
    """The fast JPEG path (simplejpeg) gives the same pixels as PIL's, reduced-size decoding included; truncated
    data still raises (through PIL's error) instead of yielding a grey-filled image."""
    import vitpipe.pipeline.transforms as T

    if T.simplejpeg is None:
        from needs import skip_or_fail

        skip_or_fail("simplejpeg not installed (a pinned dependency)")
    files = sorted((cifar_dir / "test" / "dog").glob("*.jpg"))[:40] + sorted(hymenoptera_dir.glob("train/*/*.jpg"))[:8]
    datas = [f.read_bytes() for f in files]
    for size, train in ((32, True), (224, True), (96, False)):
        tf = T.ImageTransform(size, train=train)
        fast = [tf.to_uint8(d, T.SplitMix64(i)) for i, d in enumerate(datas)]
        with monkeypatch.context() as m:
            m.setattr(T, "simplejpeg", None)
            slow = [tf.to_uint8(d, T.SplitMix64(i)) for i, d in enumerate(datas)]
        for a, b in zip(fast, slow):
            assert a.shape == (size, size, 3) and np.array_equal(a, b)
    big = max(datas, key=len)
    with pytest.raises((OSError, ValueError)):
        T.ImageTransform(64, train=False).to_uint8(big[: len(big) // 2])


def test_pad_crop_is_torch_reflect_pad_then_a_window_and_reproducible(cifar_dir):
    """The "pad" crop equals an independent reference: torch's reflect padding of the eval view, the window at the
    offsets the sample's RNG draws (row, column), then the flip it draws; the same seed gives the same image."""
    import torch.nn.functional as F

    data = next(iter(sorted(cifar_dir.rglob("*.jpg")))).read_bytes()
    tf = ImageTransform(img_size=32, train=True, crop="pad", pad_px=4, mean=(0, 0, 0), std=(1, 1, 1))
    view = ImageTransform(img_size=32, train=False).to_uint8(data)
    seen = set()
    for seed in range(40):
        got = tf.to_uint8(data, seed)
        rng = SplitMix64(seed)
        i, j = int(rng.random() * 9), int(rng.random() * 9)
        flip = rng.random() < 0.5
        padded = F.pad(torch.from_numpy(np.ascontiguousarray(view)).permute(2, 0, 1)[None].float(), (4, 4, 4, 4),
                       mode="reflect")[0]
        want = padded[:, i:i + 32, j:j + 32].permute(1, 2, 0).numpy().astype(np.uint8)
        want = want[:, ::-1] if flip else want
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(tf.to_uint8(data, seed), got)  # deterministic from the sample's seed
        seen.add((i, j, flip))
    assert len(seen) > 20  # offsets and flips do vary across samples
    with pytest.raises(ValueError, match="crop must be 'rrc' or 'pad'"):
        ImageTransform(img_size=32, train=True, crop="pad", pad_px=32)
