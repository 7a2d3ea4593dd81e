"""Ingest: folder / tar / list-file sources, pass-through, resize, bad input, determinism, resume, atomicity."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitpipe.pipeline import IngestConfig, IngestError, Manifest, ingest, plan_ingest, plan_shards, write_shard
from vitpipe.pipeline.tars import iter_tar


def members(path) -> dict[str, bytes]:
    return dict(iter_tar(open(path, "rb").read()))


def test_folder_ingest_manifest_and_members(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", per_class=10)
    (src / "README.txt").write_text("not a sample")
    m = ingest(str(src), f"file://{tmp_path}/out", IngestConfig(shard_max_samples=8, num_workers=2))
    assert m.num_samples == 30 and m.classes == ["a", "b", "c"] and not m.multi_label
    assert [s.num_samples for s in m.shards] == [8, 8, 8, 6]
    loaded = Manifest.load(f"file://{tmp_path}/out")
    assert loaded.to_dict() == m.to_dict() and loaded.url(0).endswith("/shard-000000.tar")
    keys, labels = set(), {}
    for s in m.shards:
        raw = open(tmp_path / "out" / s.name, "rb").read()
        assert hashlib.sha256(raw).hexdigest() == s.sha256 and len(raw) == s.num_bytes
        for name, data in members(tmp_path / "out" / s.name).items():
            key, ext = name.split(".", 1)
            keys.add(key)
            if ext == "json":
                labels[key] = json.loads(data)
            elif ext == "cls":
                assert int(data) == m.classes.index(key.split("_")[0])
    assert len(keys) == 30 and all("." not in k for k in keys)
    # class-mixed shards: the plan shuffles items before packing
    first = {k.split("_")[0] for k, _ in [n.split(".", 1) for n in members(tmp_path / "out" / m.shards[0].name)]}
    assert len(first) > 1
    assert labels["a_img_003"]["source"] == "a/img.003.jpg" and labels["a_img_003"]["labels"] == ["a"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_small_jpegs_pass_through_byte_for_byte(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", classes=("x",), per_class=3)
    m = ingest(str(src), str(tmp_path / "out"), IngestConfig(num_workers=0, resize_short=64))
    got = members(tmp_path / "out" / m.shards[0].name)
    for i in range(3):
        assert got[f"x_img_{i:03d}.jpg"] == (src / "x" / f"img.{i:03d}.jpg").read_bytes()


def test_resize_short_side_and_keep_original(tmp_path, jpeg_bytes):
    rng = np.random.default_rng(0)
    (tmp_path / "src" / "big").mkdir(parents=True)
    (tmp_path / "src" / "big" / "p.jpg").write_bytes(jpeg_bytes(rng, 300, 200))
    Image.new("RGB", (40, 90), (10, 200, 30)).save(tmp_path / "src" / "big" / "q.png")
    m = ingest(str(tmp_path / "src"), str(tmp_path / "out"),
               IngestConfig(num_workers=0, resize_short=50, keep_original=True, quality=80))
    got = members(tmp_path / "out" / m.shards[0].name)
    assert Image.open(io.BytesIO(got["big_p.jpg"])).size == (75, 50)
    assert got["big_p.orig.jpg"] == (tmp_path / "src" / "big" / "p.jpg").read_bytes()
    q = Image.open(io.BytesIO(got["big_q.jpg"]))
    assert q.format == "JPEG" and q.size == (40, 90)  # PNG re-encoded, not resized (short side 40 <= 50)
    assert json.loads(got["big_p.json"])["width"] == 75


def test_bad_input_counted_and_skipped(tmp_path, make_folder, capsys):
    src = make_folder(tmp_path / "src", per_class=40)
    good = (src / "a" / "img.000.jpg").read_bytes()
    (src / "a" / "trunc.jpg").write_bytes(good[: len(good) // 2])
    (src / "b" / "garbage.jpg").write_bytes(b"\x00" * 100)
    cfg = IngestConfig(num_workers=2, shard_max_samples=30, max_bad_fraction=0.05)
    m = ingest(str(src), str(tmp_path / "out"), cfg, progress=True)
    assert m.bad == {"corrupt": 2} and m.num_samples == 120
    assert "img/s" in capsys.readouterr().err
    with pytest.raises(IngestError, match="max_bad_fraction"):
        ingest(str(src), str(tmp_path / "out2"), IngestConfig(num_workers=0, max_bad_fraction=0.01))
    assert not (tmp_path / "out2" / "manifest.json").exists()


def test_unknown_class_with_fixed_class_map(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", per_class=5)
    m = ingest(str(src), str(tmp_path / "out"),
               IngestConfig(num_workers=0, classes=["a", "b"], max_bad_fraction=0.5))
    assert m.bad == {"unknown_class": 5} and m.num_samples == 10 and m.classes == ["a", "b"]


def test_deterministic_and_resumable(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", per_class=12)
    cfg = IngestConfig(shard_max_samples=10, num_workers=2, seed=7)
    m1 = ingest(str(src), str(tmp_path / "o1"), cfg)
    m2 = ingest(str(src), str(tmp_path / "o2"), IngestConfig(shard_max_samples=10, num_workers=0, seed=7))
    assert [s.sha256 for s in m1.shards] == [s.sha256 for s in m2.shards]  # same bytes, any parallelism
    # crash simulation: one shard lost, one half-written tmp left behind
    (tmp_path / "o1" / "shard-000001.tar").unlink()
    (tmp_path / "o1" / "shard-000002.tar.tmp").write_bytes(b"partial")
    (tmp_path / "o1" / "manifest.json").unlink()
    before = (tmp_path / "o1" / "shard-000000.tar").stat().st_mtime_ns
    plan = plan_ingest(str(src), cfg)
    results = [write_shard(plan.shard_items(i), plan.shard_url(str(tmp_path / "o1"), i), cfg, plan.class_index,
                           plan.multi_label) for i in range(plan.num_shards)]
    assert [r.reused for r in results] == [True, False, True, True]
    assert (tmp_path / "o1" / "shard-000000.tar").stat().st_mtime_ns == before
    m3 = ingest(str(src), str(tmp_path / "o1"), cfg)
    assert m3.to_dict() == m1.to_dict()
    # different options -> different fingerprint -> shards rewritten, not wrongly reused
    m4 = ingest(str(src), str(tmp_path / "o1"), IngestConfig(shard_max_samples=10, num_workers=0, seed=8))
    assert [s.sha256 for s in m4.shards] != [s.sha256 for s in m1.shards]


def test_plan_shards_limits():
    plan = plan_shards([100] * 10 + [5000], max_samples=4, max_bytes=None, seed=0)
    assert sorted(j for s in plan for j in s) == list(range(11)) and [len(s) for s in plan] == [4, 4, 3]
    plan = plan_shards([1000] * 10, max_samples=None, max_bytes=8000, seed=0, shuffle=False)
    assert [len(s) for s in plan] == [2, 2, 2, 2, 2]  # 1024 B of blocks + 2.5 kB of tar headers each
    assert plan_shards([1] * 9, 4, None, seed=1) == plan_shards([1] * 9, 4, None, seed=1)


def test_list_file_multi_label_source(tmp_path, jpeg_bytes):
    rng = np.random.default_rng(1)
    rows = []
    for i, labels in enumerate(["cat", "cat,dog", "dog,bird", "bird"]):
        (tmp_path / f"im{i}.jpg").write_bytes(jpeg_bytes(rng, 16, 16))
        rows.append(f"im{i}.jpg\t{labels}")
    rows.append("missing.jpg\tcat")
    (tmp_path / "list.tsv").write_text("# url\tlabels\n" + "\n".join(rows) + "\n")
    m = ingest(str(tmp_path / "list.tsv"), str(tmp_path / "out"), IngestConfig(num_workers=0, max_bad_fraction=0.3))
    assert m.multi_label and m.classes == ["bird", "cat", "dog"] and m.num_samples == 4
    assert m.bad == {"unreadable": 1}
    got = members(tmp_path / "out" / m.shards[0].name)
    labels = {k.split(".")[0]: v.decode() for k, v in got.items() if k.endswith(".labels")}
    assert sorted(labels.values()) == ["0", "0,2", "1", "1,2"]


def test_tar_source_reingest_with_resize(tmp_path, small_shards, jpeg_bytes):
    src = small_shards.replace("file://", "")
    m = ingest(src, str(tmp_path / "re"), IngestConfig(num_workers=0, shard_max_samples=100, resize_short=8))
    orig = Manifest.load(small_shards)
    assert m.classes == orig.classes and m.num_samples == orig.num_samples
    got = members(tmp_path / "re" / m.shards[0].name)
    img = next(v for k, v in got.items() if k.endswith(".jpg"))
    assert min(Image.open(io.BytesIO(img)).size) == 8
    # a plain tar written by another tool, labels from .txt
    with tarfile.open(tmp_path / "ext.tar", "w") as tf:
        for i, lab in enumerate(["x", "y", "x"]):
            for name, data in [(f"s{i}.jpg", jpeg_bytes(np.random.default_rng(i), 12, 12)), (f"s{i}.txt", lab.encode())]:
                ti = tarfile.TarInfo(name)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    m = ingest(str(tmp_path / "ext.tar"), str(tmp_path / "ext"), IngestConfig(num_workers=0))
    assert m.classes == ["x", "y"] and m.num_samples == 3


def test_cifar_ingest_real_images(tmp_path, cifar_dir):
    cfg = IngestConfig(split="test", limit_per_class=30, shard_max_bytes=40_000, num_workers=2)
    m = ingest(str(cifar_dir), f"file://{tmp_path}/c", cfg)
    assert m.num_samples == 300 and len(m.classes) == 10 and m.bad == {}
    assert len(m.shards) > 3 and all(s.num_bytes <= 40_000 + 10_240 for s in m.shards)
    sample = members(tmp_path / "c" / m.shards[0].name)
    key = next(k for k in sample if k.endswith(".json"))
    src = json.loads(sample[key])["source"]
    assert sample[key.replace(".json", ".jpg")] == (cifar_dir / "test" / src).read_bytes()


def test_config_validation():
    with pytest.raises(ValueError, match="quality"):
        IngestConfig(quality=0)
    with pytest.raises(ValueError, match="shard_max_samples or shard_max_bytes"):
        IngestConfig(shard_max_samples=None)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ingest("/nonexistent/dir", "/tmp/never", IngestConfig())


def test_read_items_coalesced_ranges_equal_single_reads(tmp_path, small_shards):
    from vitpipe.pipeline.sources import SourceItem, list_tar_source, read_items

    items, _ = list_tar_source(small_shards)
    assert len(items) > 10
    direct = []
    for it in items:
        with open(it.url.replace("file://", ""), "rb") as f:
            f.seek(it.offset)
            direct.append(f.read(it.size))
    for gap, batch in ((0, 1), (1 << 16, 7), (1 << 30, 1000)):
        assert list(read_items(items, {}, batch=batch, max_gap=gap)) == direct
    missing = SourceItem(key="gone", url=items[0].url, labels=("a",), ext="jpg", origin="x.tar:gone", offset=-1)
    lost = SourceItem(key="lost", url=str(tmp_path / "nope.jpg"), labels=("a",), ext="jpg", origin="nope.jpg")
    got = list(read_items([items[0], missing, lost, items[1]], {}))
    assert got[0] == direct[0] and got[3] == direct[1]
    assert isinstance(got[1], FileNotFoundError) and isinstance(got[2], OSError)


def test_dead_worker_is_a_clear_error_not_a_hang(tmp_path, make_folder):
    """Workers that die (here: a script without a __main__ guard, whose spawned children re-run it and crash) end
    the ingest with a clear error; `multiprocessing.Pool` would replace them forever while the task waits."""
    import subprocess
    import sys

    src = make_folder(tmp_path / "src", per_class=6)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from vitpipe.pipeline import IngestConfig, ingest\n"
        f"ingest({str(src)!r}, {str(tmp_path / 'out')!r}, IngestConfig(num_workers=2, shard_max_samples=4))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert r.returncode != 0
    assert "a worker process died" in r.stderr and "__main__" in r.stderr


def test_symlinks_out_of_the_source_root_are_not_followed(tmp_path, make_folder):
    """A file symlink is followed only to a target inside the source root; one pointing outside, and any directory
    symlink, is left out and counted as bad input (its bytes never reach a shard)."""
    from collections import Counter

    from vitpipe.pipeline.sources import list_image_folder

    src = make_folder(tmp_path / "src", per_class=10)
    outside = make_folder(tmp_path / "outside", classes=("secret",), per_class=2, seed=9)
    secret = (outside / "secret" / "img.000.jpg").read_bytes()
    (src / "a" / "leak.jpg").symlink_to(outside / "secret" / "img.000.jpg")  # absolute target, outside
    (src / "b" / "leak2.jpg").symlink_to("../../outside/secret/img.001.jpg")  # relative target, outside
    (src / "secret").symlink_to(outside / "secret", target_is_directory=True)  # a class folder elsewhere
    (src / "c" / "more").symlink_to(src / "a", target_is_directory=True)  # inside, but a directory: not walked
    (src / "c" / "alias.jpg").symlink_to("../a/img.000.jpg")  # inside the root: followed
    skipped = Counter()
    items = list_image_folder(str(src), skipped=skipped)
    assert skipped == {"symlink_outside_root": 2, "symlink_dir": 2}
    assert len(items) == 31 and not any("leak" in it.origin or "secret" in it.origin for it in items)
    alias = next(it for it in items if it.origin == "c/alias.jpg")
    assert alias.url == str(src / "a" / "img.000.jpg")  # the vetted target is what gets read
    m = ingest(str(src), str(tmp_path / "out"), IngestConfig(num_workers=0, max_bad_fraction=0.2))
    assert m.bad == {"symlink_dir": 2, "symlink_outside_root": 2} and m.num_samples == 31
    assert m.classes == ["a", "b", "c"]
    for s in m.shards:
        assert secret not in (tmp_path / "out" / s.name).read_bytes()
    # a split folder that is itself a link out of the root: nothing of it is listed
    (src / "test").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FileNotFoundError, match="symlink_outside_root"):
        list_image_folder(str(src), split="test")


def test_resume_rewrites_a_same_size_corrupt_shard(tmp_path, make_folder):
    src = make_folder(tmp_path / "src", per_class=8)
    cfg = IngestConfig(shard_max_samples=10, num_workers=0, seed=3)
    m1 = ingest(str(src), str(tmp_path / "o"), cfg)
    p = tmp_path / "o" / m1.shards[1].name
    raw = bytearray(p.read_bytes())
    i = raw.index(b"\xff\xd8\xff")  # flip bytes inside the first image: same size, still a valid tar
    raw[i + 200 : i + 208] = bytes(b ^ 0xFF for b in raw[i + 200 : i + 208])
    p.write_bytes(bytes(raw))
    plan = plan_ingest(str(src), cfg)

    def resume(c):
        return [write_shard(plan.shard_items(i), plan.shard_url(str(tmp_path / "o"), i), c, plan.class_index,
                            plan.multi_label) for i in range(plan.num_shards)]

    trusting = IngestConfig(shard_max_samples=10, num_workers=0, seed=3, verify_reused=False)
    assert [r.reused for r in resume(trusting)] == [True, True, True]  # sidecar + size alone cannot tell
    assert hashlib.sha256(p.read_bytes()).hexdigest() != m1.shards[1].sha256
    assert [r.reused for r in resume(cfg)] == [True, False, True]
    assert hashlib.sha256(p.read_bytes()).hexdigest() == m1.shards[1].sha256
    # a damaged sidecar means "not known complete": rewrite, do not crash
    (tmp_path / "o" / "shard-000002.info.json").write_text("{trunc")
    assert [r.reused for r in resume(cfg)] == [True, True, False]
    assert ingest(str(src), str(tmp_path / "o"), cfg).to_dict() == m1.to_dict()
