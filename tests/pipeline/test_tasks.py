"""Task splits: stratified held-out splits, folders without a test split, validation views, split records."""

import numpy as np
import pytest

from vitpipe.pipeline.tasks import (
    DigitsTask,
    ImageFolderTask,
    ShardSetTask,
    holdout_fraction,
    index_digest,
    stratified_holdout,
)


def test_stratified_holdout_counts_determinism_and_edge_classes():
    labels = np.array([0] * 50 + [1] * 13 + [2] * 1 + [3] * 2)
    kept, held = stratified_holdout(labels, 0.2, seed=5)
    assert np.bincount(labels[held], minlength=4).tolist() == [10, 3, 0, 1]  # round(0.2 n), >= 1, never all
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(labels.size))
    assert np.all(np.diff(held) > 0) and np.all(np.diff(kept) > 0) and kept.dtype == held.dtype == np.int64
    again = stratified_holdout(labels, 0.2, seed=5)
    assert np.array_equal(again[1], held) and not np.array_equal(stratified_holdout(labels, 0.2, seed=6)[1], held)
    # Which images are held out: per class, the first round(f n) of one seeded permutation per class.
    rng = np.random.default_rng(5)
    ref = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n]
                                  for c, n in zip(range(4), [10, 3, 0, 1])]))
    assert np.array_equal(held, ref)
    with pytest.raises(ValueError, match="fraction must be in"):
        stratified_holdout(labels, 1.0, 0)
    assert holdout_fraction(19_999) == 0.10 and holdout_fraction(20_000) == 0.02


def test_folder_with_only_train_gets_a_recorded_held_out_test(tmp_path, make_folder):
    make_folder(tmp_path / "only_train" / "train", classes=("a", "b", "c"), per_class=10, size=(8, 8))
    t = ImageFolderTask(str(tmp_path / "only_train"), test_fraction=0.3, split_seed=2)
    assert (t.num_train, t.num_test, t.classes) == (21, 9, ["a", "b", "c"])
    info = t.split_info()
    all_labels = np.repeat([0, 1, 2], 10)  # listing order: sorted by path, class by class
    _, held = stratified_holdout(all_labels, 0.3, 2)
    assert info == {"task": "only_train", "kind": "held_out", "from_split": "train", "seed": 2, "fraction": 0.3,
                    "held_out_digest": index_digest(held), "sizes": {"train": 21, "test": 9}}
    files = sorted(str(p) for p in (tmp_path / "only_train" / "train").rglob("*.jpg"))
    assert t.paths("test") == [files[i] for i in held] and np.array_equal(t.test_labels, all_labels[held])
    assert t.load("test", [0])[0].size == (8, 8)
    assert ImageFolderTask(str(tmp_path / "only_train"), test_fraction=0.3, split_seed=2).paths("test") == t.paths(
        "test")

    make_folder(tmp_path / "flat", classes=("x", "y"), per_class=5, size=(8, 8))  # class folders at the root
    flat = ImageFolderTask(str(tmp_path / "flat"))
    assert (flat.num_train, flat.num_test) == (8, 2) and flat.split_info()["from_split"] == "all"


def test_folder_test_split_names_and_errors(tmp_path, make_folder):
    make_folder(tmp_path / "v" / "train", classes=("a", "b"), per_class=4, size=(8, 8))
    make_folder(tmp_path / "v" / "val", classes=("a", "b"), per_class=2, size=(8, 8))
    t = ImageFolderTask(str(tmp_path / "v"))
    assert (t.num_train, t.num_test) == (8, 4)
    assert t.split_info() == {"task": "v", "kind": "given", "test_source": "val", "sizes": {"train": 8, "test": 4}}
    make_folder(tmp_path / "t" / "test", classes=("a",), per_class=2, size=(8, 8))
    with pytest.raises(FileNotFoundError, match="found .*/t/test but no .*/t/train"):
        ImageFolderTask(str(tmp_path / "t"))


def test_validation_view_reads_only_train_and_is_recorded(hymenoptera_dir):
    task = ImageFolderTask(str(hymenoptera_dir))
    reads = []
    orig = task._raw
    task._raw = lambda split, i: reads.append((split, i)) or orig(split, i)
    val = task.validation()                             # 245 training photos: 10% by the paper's rule
    kept, held = stratified_holdout(task.train_labels, 0.10, 0)
    assert (val.name, val.num_train, val.num_test, val.classes) == ("hymenoptera.val", 245 - 24, 24, task.classes)
    assert np.array_equal(val.train_labels, task.train_labels[kept])
    assert np.array_equal(val.test_labels, task.train_labels[held])
    split, rows = val.source("test", [0, 3])
    assert split == "train" and np.array_equal(rows, held[[0, 3]])
    info = val.split_info()
    assert info["kind"] == "validation" and info["fraction"] == 0.10 and info["seed"] == 0
    assert info["held_out_digest"] == index_digest(held) and info["base"]["kind"] == "given"
    assert info["sizes"] == {"train": 221, "test": 24}
    from vitpipe.pipeline import ImageTransform

    list(val.batches("test", None, ImageTransform(img_size=32), batch_size=8))
    val.load("train", [0, 5])
    assert reads == [("train", int(i)) for i in held] + [("train", int(kept[0])), ("train", int(kept[5]))]
    assert task.validation(0.2, seed=3).num_test == 49 and val.validation().base is val  # a view of a view works
    with pytest.raises(ValueError, match="split must be one of"):
        val.source("val", [0])


def test_digits_split_is_recorded():
    info = DigitsTask().split_info()
    assert info["kind"] == "fixed" and info["sizes"] == {"train": 1257, "test": 540} and info["fraction"] == 0.3


def test_shard_set_without_test_manifest_holds_one_out(small_shards):
    man = f"{small_shards}/manifest.json"
    both = ShardSetTask(man, man, name="s")
    carved = ShardSetTask(man, name="s", test_fraction=0.2, split_seed=1)
    kept, held = stratified_holdout(both.train_labels, 0.2, 1)
    assert (carved.num_train, carved.num_test) == (120, 30)
    assert np.array_equal(carved.test_labels, both.train_labels[held])
    assert carved.split_info()["held_out_digest"] == index_digest(held)
    assert np.array_equal(np.asarray(carved.load("test", [4])[0]), np.asarray(both.load("train", [held[4]])[0]))
    assert both.split_info()["kind"] == "given"
