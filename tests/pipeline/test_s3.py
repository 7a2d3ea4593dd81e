"""Ingest to and stream from S3 (moto server on 127.0.0.1), with one filesystem per loader worker."""

from __future__ import annotations

import pytest
from needs import need_module

from vitpipe.pipeline import IngestConfig, Manifest, ShardStream, StreamConfig, ingest

need_module("s3fs", "S3 tests need s3fs (test extra)")
need_module("moto.server", "S3 tests need moto[server] (test extra)")


@pytest.mark.slow
def test_ingest_and_stream_on_s3(tmp_path, make_folder, s3):
    src = make_folder(tmp_path / "src", per_class=16, size=(20, 20))
    dest = "s3://vitpipe-test/run1/shards"
    m = ingest(str(src), dest, IngestConfig(shard_max_samples=12, num_workers=2), storage_options=s3)
    assert m.num_samples == 48 and len(m.shards) == 4
    loaded = Manifest.load(dest, storage_options=s3)
    assert loaded.url(0) == dest + "/shard-000000.tar" and loaded.to_dict() == m.to_dict()
    # resume against object storage: nothing is rewritten
    again = ingest(str(src), dest, IngestConfig(shard_max_samples=12, num_workers=0), storage_options=s3)
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in m.shards]
    keys = []
    for r in range(2):
        cfg = StreamConfig(batch_size=4, img_size=16, num_workers=2, storage_options=s3, drop_last=False)
        s = ShardStream(dest, cfg, rank=r, world_size=2)
        batches = list(s.iter_batches())
        assert len(batches) == 6 and s.stats["failed_shards"] == 0
        keys += [k for _, _, ks in batches for k in ks]
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 48
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        Manifest.load("s3://vitpipe-test/missing", storage_options=s3)


@pytest.mark.slow
def test_reingest_webdataset_from_s3(tmp_path, make_folder, s3):
    """A tar source on object storage: members fetched by coalesced range reads give the same shards as a local
    copy of the same tar."""
    import fsspec

    src = make_folder(tmp_path / "src", per_class=10, size=(20, 20))
    local = ingest(str(src), str(tmp_path / "wds"), IngestConfig(shard_max_samples=100, num_workers=0))
    fs = fsspec.filesystem("s3", **s3)
    name = local.shards[0].name  # the same tar name: sample JSON records its origin as <tar name>/<member>
    fs.put(str(tmp_path / "wds" / name), f"vitpipe-test/wds/{name}")
    cfg = IngestConfig(shard_max_samples=8, num_workers=0)
    from_s3 = ingest(f"s3://vitpipe-test/wds/{name}", str(tmp_path / "re_s3"), cfg, storage_options=s3)
    from_disk = ingest(str(tmp_path / "wds" / local.shards[0].name), str(tmp_path / "re_disk"), cfg)
    assert from_s3.num_samples == local.num_samples == 30 and from_s3.bad == {}
    assert [s.sha256 for s in from_s3.shards] == [s.sha256 for s in from_disk.shards]
