"""fsio: URL joins, checked relative names, atomic writes (local, S3 via moto, the generic temp + mv path)."""

from __future__ import annotations

import os
import stat

import fsspec
import pytest

from vitpipe.pipeline.fsio import check_relative_path, join_url, open_atomic, write_atomic, write_bytes_atomic


def test_join_url_several_parts_keeps_the_scheme():
    assert join_url("s3://b/x/", "/y/", "z.tar") == "s3://b/x/y/z.tar"
    assert join_url("file:///tmp/a", "b", "", "c") == "file:///tmp/a/b/c"
    assert join_url("/tmp/a/", "manifest.json") == "/tmp/a/manifest.json"
    assert join_url("memory://r") == "memory://r"


@pytest.mark.parametrize("bad", ["../x.tar", "a/../../x.tar", "./x.tar", "/etc/passwd", "file:///etc/passwd",
                                 "s3://other/x.tar", "a//b.tar", "a\\..\\b.tar", "~/x.tar", "%2e%2e/x.tar",
                                 ".hidden.tar", "a b.tar", "é.tar", "", "a/"])
def test_check_relative_path_rejects_escapes(bad):
    with pytest.raises(ValueError, match="shard name"):
        check_relative_path(bad, "shard name")


def test_check_relative_path_accepts_plain_and_nested_names():
    for ok in ("shard-000000.tar", "train/part-0/shard-000001.tar", "a.b_c=d+e-f.tar"):
        assert check_relative_path(ok, suffix=".tar") == ok
    with pytest.raises(ValueError, match="does not end with '.tar'"):
        check_relative_path("manifest.json", suffix=".tar")


def _leftovers(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def test_local_write_replaces_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "sub" / "f.json"
    write_bytes_atomic(str(target), b"one")  # parent folder created
    write_bytes_atomic(f"file://{target}", b"two")
    assert target.read_bytes() == b"two" and _leftovers(target.parent) == []
    umask = os.umask(0)
    os.umask(umask)
    # permissions follow the umask like a plain open() (a 0600 temp file would hide shards from other users)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_local_error_mid_write_keeps_the_old_file(tmp_path):
    fs = fsspec.filesystem("file")
    target = tmp_path / "f.bin"
    target.write_bytes(b"old complete file")
    with pytest.raises(RuntimeError, match="boom"):
        with open_atomic(fs, str(target)) as f:
            f.write(b"new but half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old complete file" and _leftovers(tmp_path) == []


def test_local_failed_fsync_or_rename_keeps_the_old_file(tmp_path, monkeypatch):
    fs = fsspec.filesystem("file")
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def fail(*a, **kw):
        raise OSError("disk gone")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", fail)  # data must reach the disk before the rename makes it visible
        with pytest.raises(OSError, match="disk gone"):
            write_atomic(fs, str(target), b"new")
    assert target.read_bytes() == b"old"
    with monkeypatch.context() as m:
        m.setattr(os, "replace", fail)
        m.setattr(os, "rename", fail)
        m.setattr("shutil.move", fail)
        with pytest.raises(OSError, match="disk gone"):  # a crash at the rename: the target was not deleted first
            write_atomic(fs, str(target), b"new")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_two_local_writers_use_distinct_temp_files(tmp_path):
    fs = fsspec.filesystem("file")
    target = tmp_path / "f.bin"
    with open_atomic(fs, str(target)) as a:
        a.write(b"A" * 1000)
        with open_atomic(fs, str(target)) as b:
            b.write(b"B" * 10)
            temps = _leftovers(tmp_path)
            assert len(temps) == 2 and all(t.startswith(".f.bin.") for t in temps)
        assert target.read_bytes() == b"B" * 10
        a.write(b"A")
    assert target.read_bytes() == b"A" * 1001 and _leftovers(tmp_path) == []


def test_generic_filesystem_path_memory():
    fs = fsspec.filesystem("memory")
    path = "/vitpipe-fsio-test/f.bin"
    write_atomic(fs, path, b"old")
    with pytest.raises(RuntimeError):
        with open_atomic(fs, path) as f:
            f.write(b"new")
            raise RuntimeError("boom")
    assert fs.cat_file(path) == b"old" and fs.ls("/vitpipe-fsio-test", detail=False) == [path]
    write_bytes_atomic("memory://vitpipe-fsio-test/f.bin", b"new")
    assert fs.cat_file(path) == b"new"
    assert fs.ls("/vitpipe-fsio-test", detail=False) == [path]
    fs.rm("/vitpipe-fsio-test", recursive=True)


def test_s3_error_mid_write_publishes_nothing(s3):
    import s3fs

    fs = s3fs.S3FileSystem(**s3, skip_instance_cache=True)
    url = "s3://vitpipe-test/fsio/f.bin"
    write_bytes_atomic(url, b"old", storage_options=s3)
    with pytest.raises(RuntimeError):
        with open_atomic(fs, url) as f:
            f.write(b"new but half")
            raise RuntimeError("boom")
    fs.invalidate_cache()
    assert fs.cat_file(url) == b"old"
    assert fs.ls("vitpipe-test/fsio", detail=False) == ["vitpipe-test/fsio/f.bin"]  # no partial temporary object
    with open_atomic(fs, url) as f:
        f.write(b"new")
        f.write(b" complete")
    fs.invalidate_cache()
    assert fs.cat_file(url) == b"new complete"
    assert fs.ls("vitpipe-test/fsio", detail=False) == ["vitpipe-test/fsio/f.bin"]
    assert not fs.list_multipart_uploads("vitpipe-test")  # the failed upload was aborted, not left to bill
