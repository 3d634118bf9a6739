"""The training loader on an ENCDIR in a bucket (moto's S3 server on loopback), through the node's cache
(shards/cache.py): the same batches as from disk, a bounded cache, a changed object, a lost cache."""

from __future__ import annotations

import itertools
import os
import time

import pytest
import torch

from shards import cache, loader, storage
from shards.errors import SigmaError
from tests.shards.synthetic import write_encdir

BUCKETS = {(64, 64): 7, (32, 64): 5, (64, 32): 4}  # latent 8x8, 4x8, 8x4
SETS = {"recaption": lambda i: (3 + i % 5, 20.0 + i), "original": lambda i: (2, 30.0) if i % 2 == 0 else None}


@pytest.fixture(scope="module")
def local_enc(tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    write_encdir(root, BUCKETS, sets=SETS)
    return root


@pytest.fixture
def enc(local_enc, bucket):
    """The same ENCDIR on disk and in the bucket: (local path, bucket Loc)."""
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put(str(local_enc), bucket[5:] + "/enc", recursive=True)
    return local_enc, storage.resolve(bucket + "/enc")


def batches(where, n=None, **kw):
    kw = {"batch_size": 2, "num_workers": 0, "shuffle_buffer": 4, "real_prompt_ratio": 0.5, "seed": 3, **kw}
    if n is None:
        return list(loader.make_loader(where, resample=False, keep_partial=True, **kw))
    return list(itertools.islice(iter(loader.make_loader(where, **kw)), n))


def same(a, b):
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    assert [x["caption"] for x in a] == [x["caption"] for x in b]
    assert [x["caption_source"] for x in a] == [x["caption_source"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["latent"], y["latent"]) and torch.equal(x["y"], y["y"])
        assert x["bucket_hw"] == y["bucket_hw"]


def _downloads_done():
    """Wait for the streamed downloads an abandoned loader (num_workers=0: this process) left running."""
    import threading

    deadline = time.time() + 30
    while any(t.name.startswith(cache.THREAD) for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)


def folder_bytes(folder):
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def test_same_batches_as_from_disk(enc, tmp_path):
    local, remote = enc
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    same(batches(remote, cache=c), batches(local))  # one pass, epoch mode (read-ahead)
    same(batches(remote, 12, cache=c), batches(local, 12))  # resampled draws, warm cache
    assert loader.null_caption(remote).shape == (300, 8)
    loader.check_vae(remote, 0.13025, 4)


def test_two_workers_and_a_cold_cache_give_the_same_batches(enc, tmp_path):
    local, remote = enc
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    same(batches(remote, 10, num_workers=2, cache=c), batches(local, 10, num_workers=2))


def test_a_cache_smaller_than_the_data_stays_bounded_and_correct(enc, tmp_path):
    local, remote = enc
    shard_sizes = [p.stat().st_size for p in local.rglob("*") if p.is_file() and "shards" in p.parts]
    limit = sum(shard_sizes) // 3
    c = cache.ShardCache(tmp_path / "cache", limit)
    same(batches(remote, 30, cache=c), batches(local, 30))
    assert c.evictions > 0 and c.misses > len(shard_sizes)  # objects fetched again after eviction
    assert folder_bytes(tmp_path / "cache") <= limit + max(shard_sizes)


def test_a_lost_cache_is_an_empty_cache(enc, tmp_path):
    import shutil

    local, remote = enc
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    first = batches(remote, 6, cache=c)
    _downloads_done()
    shutil.rmtree(tmp_path / "cache")  # the node's disk is gone
    same(batches(remote, 6, cache=c), first)
    same(first, batches(local, 6))


def test_a_changed_object_is_fetched_again(tmp_path, bucket):
    loc = storage.resolve(bucket + "/x.bin")
    loc.write_object(b"one")
    c = cache.ShardCache(tmp_path / "cache", 1 << 20)
    etag, size = cache.version(loc.fs.info(loc.path))
    with c.open(loc, etag, size) as f:
        assert f.read() == b"one"
    with c.open(loc, etag, size) as f:
        assert f.read() == b"one"
    assert (c.hits, c.misses) == (1, 1)
    loc.write_object(b"two")  # same size, another ETag
    etag2, size2 = cache.version(loc.fs.info(loc.path))
    assert etag2 != etag
    with c.open(loc, etag2, size2) as f:
        assert f.read() == b"two"
    assert c.misses == 2


def test_a_killed_download_leaves_no_entry(tmp_path, bucket, monkeypatch):
    loc = storage.resolve(bucket + "/x.bin")
    loc.write_object(b"x" * 1000)
    c = cache.ShardCache(tmp_path / "cache", 1 << 20)

    def half(self, dest):
        open(dest, "wb").write(b"x" * 10)
        raise KeyboardInterrupt  # killed mid-download

    monkeypatch.setattr(storage.Loc, "download", half)
    with pytest.raises(KeyboardInterrupt):
        c.open(loc, "e", 1000)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "cache").iterdir())


def test_missing_bucket_and_key_are_one_line(tmp_path, s3_server, bucket):
    c = cache.ShardCache(tmp_path / "cache", 1 << 20)
    for url in ("s3://no-such-bucket-sigmaforge/enc", bucket + "/no-such-enc"):
        with pytest.raises(SigmaError) as e:
            loader.make_loader(storage.resolve(url), batch_size=2, cache=c)
        assert url in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SigmaError) as e:
        c.open(storage.resolve(bucket + "/gone.tar"), "e", 3)
    assert str(e.value) == f"{bucket}/gone.tar: not found"


def test_no_cache_for_a_bucket_is_refused(enc):
    with pytest.raises(SigmaError, match="cache"):
        loader.make_loader(enc[1], batch_size=2)


def test_local_data_is_read_in_place(local_enc, tmp_path):
    c = cache.ShardCache(tmp_path / "cache", 1 << 20)
    batches(local_enc, 4, cache=c)
    assert not (tmp_path / "cache").exists() and c.misses == c.hits == 0
    assert os.path.isdir(local_enc)


def test_shards_are_read_while_they_download(enc, tmp_path, monkeypatch):
    """Streamed misses in many small ranged GETs, a set file's footer first: the same batches."""
    local, remote = enc
    monkeypatch.setattr(cache, "CHUNK", 3000)
    monkeypatch.setattr(cache, "TAIL", 1000)
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    same(batches(remote, 12, cache=c), batches(local, 12))
    assert c.misses > 0 and c.fetched_bytes > 0
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")]


def test_a_streamed_download_that_fails_fails_its_reader_and_leaves_no_entry(tmp_path, bucket, monkeypatch):
    loc = storage.resolve(bucket + "/x.tar")
    loc.write_object(bytes(range(256)) * 40)
    monkeypatch.setattr(cache, "CHUNK", 1000)
    real, calls = cache._read_range, []

    def dies_on_the_third_range(loc, offset, size):
        calls.append(offset)
        if len(calls) == 3:
            raise ConnectionError("connection reset")
        return real(loc, offset, size)

    monkeypatch.setattr(cache, "_read_range", dies_on_the_third_range)
    c = cache.ShardCache(tmp_path / "cache", 1 << 20)
    etag, size = cache.version(loc.fs.info(loc.path))
    with c.open(loc, etag, size, stream=True) as f:
        assert f.read(1000) == (bytes(range(256)) * 40)[:1000]
        with pytest.raises(SigmaError, match="connection reset"):
            f.read()
    deadline = time.time() + 10  # the download thread removes its temp file as it ends
    while any(p.name.endswith(".tmp") for p in (tmp_path / "cache").iterdir()) and time.time() < deadline:
        time.sleep(0.01)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []
    monkeypatch.setattr(cache, "_read_range", real)
    with c.open(loc, etag, size, stream=True) as f:
        assert f.read() == bytes(range(256)) * 40


def test_a_restarted_loader_reads_no_row_file_again(enc, tmp_path, s3_counted):
    _, remote = enc
    c = cache.ShardCache(tmp_path / "cache", 1 << 30)
    loader.make_loader(remote, batch_size=2, cache=c)
    assert s3_counted.count("GET", ".parquet") > 0
    s3_counted.requests.clear()
    loader.make_loader(remote, batch_size=2, cache=c)  # the same listing: the rows read before
    assert s3_counted.count("GET", ".parquet") == 0
    (remote / "shards" / "64x64" / "note.txt").write_object(b"x")  # another listing: the rows are read again
    s3_counted.requests.clear()
    loader.make_loader(remote, batch_size=2, cache=c)
    assert s3_counted.count("GET", ".parquet") > 0


def test_a_shard_gone_mid_run_is_one_line(enc, tmp_path):
    _, remote = enc
    dl = loader.make_loader(remote, batch_size=2, num_workers=1, cache=cache.ShardCache(tmp_path / "c", 1 << 30))
    for tar in remote.glob("shards/*/*.tar"):
        tar.unlink()
    with pytest.raises(SigmaError) as e:
        next(iter(dl))
    message = str(loader.worker_error(e.value))
    assert message.startswith(str(remote)) and message.endswith(".tar: not found"), message
