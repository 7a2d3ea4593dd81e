"""Embedding functions over real images (CIFAR-10 JPEGs) and the representations they read from a ViT."""

from pathlib import Path

import numpy as np
import pytest
import torch
from needs import in_ci, need_dir
from PIL import Image

from vitpipe.jobs.evals.features import make_embed_fn, model_fingerprint, represent
from vitpipe.jobs.evals.fewshot import FewshotConfig, fewshot_eval
from vitpipe.models import create

DATA = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "cifar10"
# Locally a skip; in CI (needs.in_ci) the test runs and its first line fails on the missing folder (need_dir).
needs_cifar = pytest.mark.skipif(not DATA.is_dir() and not in_ci(), reason=f"CIFAR-10 JPEGs not found at {DATA}")


class FolderTask:
    """Minimal <root>/<split>/<class>/*.jpg task (the pipeline's ImageFolderTask does this for real); keeps only
    the first ``per_class`` images of each class so tests stay fast."""

    def __init__(self, root: Path, per_class: int):
        self.name = "cifar10"
        self.classes = sorted(p.name for p in (root / "train").iterdir())
        self.files, labels = {}, {}
        for split in ("train", "test"):
            files, labs = [], []
            for c, cls in enumerate(self.classes):
                for f in sorted((root / split / cls).glob("*.jpg"))[:per_class]:
                    files.append(f)
                    labs.append(c)
            self.files[split], labels[split] = files, np.array(labs)
        self.train_labels, self.test_labels = labels["train"], labels["test"]
        self.loaded = 0

    def load(self, split, indices):
        self.loaded += len(indices)
        return [Image.open(self.files[split][i]).convert("RGB") for i in indices]


def to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL -> (3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.fixture(scope="module")
def task():
    need_dir(DATA, "CIFAR-10 JPEGs")
    return FolderTask(DATA, per_class=30)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create("mu/4", img_size=32, num_classes=10, representation_size=48, dropout=0.1).eval()


def test_representations_read_the_right_tensors(model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert torch.allclose(represent(model, x, "pre_logits"), model.pre_logits(x))
        assert represent(model, x, "pre_logits").shape == (3, 48)
        assert torch.equal(represent(model, x, "token"), tokens[:, 0])
        assert torch.allclose(represent(model, x, "gap"), tokens[:, 1:].mean(1))
    gap_model = create("mu/4", img_size=32, num_classes=0, pool="gap")
    with pytest.raises(ValueError, match="needs a class token"):
        represent(gap_model, x, "token")
    with pytest.raises(ValueError, match="representation must be one of"):
        represent(model, x, "cls")


@needs_cifar
def test_embed_fn_on_real_jpegs_is_batch_invariant_and_in_eval_mode(task, model):
    model.train()  # make_embed_fn must switch dropout off itself
    idx = np.array([0, 5, 17, 42, 99, 250, 3])
    a = make_embed_fn(model, task, to_tensor, batch_size=3)("train", idx)
    b = make_embed_fn(model, task, to_tensor, batch_size=64, prefetch=0)("train", idx)
    assert a.shape == (7, 48) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    ref = model.pre_logits(torch.stack([to_tensor(im) for im in task.load("train", idx)])).detach().numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
    assert not model.training


@needs_cifar
def test_fewshot_on_real_cifar_pixels_beats_chance(task):
    # Raw pixels (8x8 average-pooled) through the full evaluator: 10-shot CIFAR-10 from pixels is well above the
    # 10% chance level (about 20-25% in the literature), a check that labels, sampling and solver line up.
    def pixels(split, indices):
        x = torch.stack([to_tensor(im) for im in task.load(split, indices)])
        return torch.nn.functional.avg_pool2d(x, 4).flatten(1).numpy()

    res = fewshot_eval(pixels, task, FewshotConfig(shots=(1, 10, 25), seeds=(0, 1, 2)))
    assert res["cifar10/10shot/mean"] > 0.15
    assert res["cifar10/25shot/mean"] > res["cifar10/1shot/mean"]
    # Shuffled labels destroy it: the probe learns from the labels, not from leakage.
    shuffled = FolderTask.__new__(FolderTask)
    shuffled.__dict__.update(task.__dict__)
    shuffled.test_labels = np.random.default_rng(0).permutation(task.test_labels)
    res_bad = fewshot_eval(pixels, shuffled, FewshotConfig(shots=(25,), seeds=(0, 1, 2)))
    assert res_bad["cifar10/25shot/mean"] < 0.16


def test_pipeline_task_batched_path_matches_per_image_path(model):
    # vitpipe.pipeline tasks + ImageTransform take the batched uint8 path; hiding `batches` forces the per-image
    # path through task.load + transform. Both must give the same features.
    from vitpipe.pipeline import DigitsTask, ImageTransform

    digits = DigitsTask(size=32)
    tf = ImageTransform(img_size=32, train=False)

    class LoadOnly:
        name, load = digits.name, digits.load

    idx = np.arange(0, 300, 7)
    a = make_embed_fn(model, digits, img_size=32, batch_size=16)("test", idx)
    b = make_embed_fn(model, LoadOnly(), tf, batch_size=5, prefetch=3)("test", idx)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    res = fewshot_eval(make_embed_fn(model, digits, img_size=32), digits, FewshotConfig(shots=(5,), seeds=(0,)))
    assert 0.1 < res["digits/5shot/mean"] <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_embed_on_cuda_matches_cpu():
    from vitpipe.pipeline import DigitsTask

    digits = DigitsTask(size=32)
    torch.manual_seed(0)
    m = create("Ti/4", img_size=32, num_classes=0)
    idx = np.arange(200)
    cpu = make_embed_fn(m, digits, img_size=32, batch_size=64)("test", idx)
    gpu = make_embed_fn(m, digits, img_size=32, batch_size=64, device="cuda")("test", idx)
    assert next(m.parameters()).is_cuda
    np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-3)  # TF32/cuBLAS vs CPU fp32 accumulation order


def test_loader_errors_reach_the_caller(model):
    class Broken:
        name = "broken"

        def load(self, split, indices):
            if indices[0] >= 8:
                raise OSError("truncated JPEG at index 8")
            return [Image.new("RGB", (32, 32)) for _ in indices]

    with pytest.raises(OSError, match="truncated JPEG"):
        make_embed_fn(model, Broken(), to_tensor, batch_size=4, prefetch=2)("train", np.arange(20))


def test_fingerprint_tracks_weights_and_extra():
    torch.manual_seed(0)
    a = create("mu/4", img_size=32, num_classes=0)
    torch.manual_seed(0)
    b = create("mu/4", img_size=32, num_classes=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a, {"res": 32}) != model_fingerprint(a, {"res": 48})
    with torch.no_grad():
        b.pos_embed[0, 0, 0] += 1e-3
    assert model_fingerprint(a) != model_fingerprint(b)


def test_make_embed_fn_argument_errors(model):
    with pytest.raises(ValueError, match="representation must be one of"):
        make_embed_fn(model, object(), to_tensor, representation="mean")
    with pytest.raises(ValueError, match="needs a transform or an img_size"):
        make_embed_fn(model, object())


@pytest.mark.parametrize("part", ["", ".", ".."])
def test_feature_cache_refuses_dot_parts(tmp_path, part):
    from vitpipe.jobs.evals.features import FeatureCache

    cache = FeatureCache(str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="feature cache key part"):
        cache.entry_path(model_key="m", task=part, split="test", resolution=32, representation="gap")
    with pytest.raises(ValueError, match="feature cache key part"):
        cache.entry_path(model_key=part, task="t", split="test", resolution=32, representation="gap")


def test_feature_cache_key_parts_stay_inside_the_root(tmp_path):
    import os

    from vitpipe.jobs.evals.features import FeatureCache

    root = tmp_path / "cache"
    cache = FeatureCache(str(root))
    paths = set()
    for task in ("../../escape", "/etc", "a/b", "a_b", "..a", ".hidden", "a/../.."):
        path = cache.entry_path(model_key="../m", task=task, split="../test", resolution="../1",
                                representation="gap")
        rel = os.path.relpath(os.path.normpath(path), root)
        assert not rel.startswith("..") and len(rel.split(os.sep)) == 3, (task, path)
        paths.add(path)
    assert len(paths) == 7  # distinct parts never share an entry ("a/b" vs "a_b")
    assert cache.entry_path(model_key="m1", task="cifar10", split="test", resolution=32,
                            representation="gap") == f"{root}/m1/cifar10/test-r32-gap"  # safe names unchanged
    cache.features(lambda split, idx: np.ones((len(idx), 2), np.float32), "test", np.arange(3),
                   model_key="m", task="../../escape", resolution=None, representation="gap")
    assert sorted(os.listdir(tmp_path)) == ["cache"]  # nothing written beside the root
