"""Manifest: shard names cannot point outside the manifest's folder; save/load round trip; one-line load errors."""

from __future__ import annotations

import json
import os

import pytest

from vitpipe.pipeline import Manifest, ShardInfo

SHA = "0" * 64


def _write(folder, names) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    d = {"version": 1, "classes": ["a"],
         "shards": [{"name": n, "num_samples": 1, "num_bytes": 10, "sha256": SHA} for n in names]}
    (folder / "manifest.json").write_text(json.dumps(d))
    return str(folder)


@pytest.mark.parametrize("name", ["../x.tar", "sub/../../x.tar", "/etc/passwd", "file:///etc/passwd",
                                  "s3://other-bucket/x.tar", "..\\x.tar", "sub//x.tar", "./x.tar",
                                  "shard-000000.tar.json"])
def test_crafted_shard_name_fails_to_load_naming_it(tmp_path, name):
    url = _write(tmp_path / "m", ["shard-000000.tar", name])
    with pytest.raises(ValueError) as e:
        Manifest.load(url)
    msg = str(e.value)
    assert "\n" not in msg and "invalid shard manifest" in msg and repr(name) in msg
    with pytest.raises(ValueError, match="shard name"):
        Manifest.load(f"file://{tmp_path}/m/manifest.json")


def test_nested_shard_names_load_and_join_inside_the_folder(tmp_path):
    url = _write(tmp_path / "m", ["shard-000000.tar", "train/part-1/shard-000001.tar"])
    m = Manifest.load(url)
    assert m.url(1) == f"{tmp_path}/m/train/part-1/shard-000001.tar"
    assert m.url("shard-000000.tar") == f"{tmp_path}/m/shard-000000.tar"
    with pytest.raises(ValueError, match="'../x.tar'"):
        m.url("../x.tar")  # names given directly are checked too


def test_shard_info_refuses_escaping_names():
    with pytest.raises(ValueError, match="'/abs/x.tar'"):
        ShardInfo(name="/abs/x.tar", num_samples=1, num_bytes=1, sha256=SHA)


def test_load_errors_are_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"version": 1, "classes": []}))
    with pytest.raises(ValueError, match=r"invalid shard manifest .*: missing field 'shards'$"):
        Manifest.load(str(tmp_path / "m"))
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="invalid shard manifest"):
        Manifest.load(str(tmp_path / "m"))


def test_save_is_atomic_and_round_trips(tmp_path):
    m = Manifest(shards=[ShardInfo("shard-000000.tar", 3, 100, SHA)], classes=["a", "b"], bad={"corrupt": 1})
    url = m.save(str(tmp_path / "out"))
    assert url == f"{tmp_path}/out/manifest.json" and m.base_url == str(tmp_path / "out")
    m.save()  # over the existing file
    assert Manifest.load(str(tmp_path / "out")).to_dict() == m.to_dict()
    assert os.listdir(tmp_path / "out") == ["manifest.json"]  # no temporary file left behind
