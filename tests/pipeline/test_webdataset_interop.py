"""Our shards are plain WebDataset shards: the `webdataset` library reads them, and its writer's shards ingest."""

from __future__ import annotations

import io

import numpy as np
from needs import need_module
from PIL import Image

from vitpipe.pipeline import IngestConfig, Manifest, ShardStream, StreamConfig, ingest
from vitpipe.pipeline.tars import parse_shard

wds = need_module("webdataset")


def test_webdataset_library_reads_our_shards(small_shards):
    man = Manifest.load(small_shards)
    for shard in man.shards:
        url = man.url(shard).replace("file://", "")
        theirs = {s["__key__"]: s for s in wds.WebDataset(url, shardshuffle=False, empty_check=False)}
        with open(url, "rb") as f:
            ours, truncated = parse_shard(f.read(), set())
        assert not truncated and len(ours) == len(theirs) == shard.num_samples
        for key, img, label in ours:
            assert theirs[key]["jpg"] == img and int(theirs[key]["cls"]) == label
            Image.open(io.BytesIO(theirs[key]["jpg"])).verify()


def test_shards_written_by_webdataset_ingest_and_stream(tmp_path, jpeg_bytes):
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(tmp_path / "wds-%03d.tar"), maxcount=10) as sink:
        for i in range(25):
            sink.write({"__key__": f"sample{i:04d}", "jpg": jpeg_bytes(rng, 20, 18), "cls": str(i % 3).encode()})
    src = str(tmp_path / "wds-{000..002}.tar")
    man = ingest(src, str(tmp_path / "ours"), IngestConfig(num_workers=0, shard_max_samples=8))
    assert man.num_samples == 25 and man.bad == {}
    stream = ShardStream(str(tmp_path / "ours"), StreamConfig(batch_size=5, img_size=16, num_workers=0,
                                                              shuffle=False, drop_last=False))
    keys, labels = [], []
    for x, y, k in stream.iter_batches():
        assert x.shape == (5, 3, 16, 16)
        keys += k
        labels += y.tolist()
    assert len(keys) == 25 and len(set(keys)) == 25
    by_key = dict(zip(keys, labels))
    # the class map of an ingest keeps the source's labels (here the integer classes as names)
    assert all(man.classes[by_key[k]] == str(int(k.split("sample")[-1]) % 3) for k in keys)
