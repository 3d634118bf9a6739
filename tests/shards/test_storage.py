"""shards/storage.py against a real S3 API on loopback (moto's server) and on disk: one interface for both."""

from __future__ import annotations

import pickle

import pytest

from shards import atomic, storage
from shards.errors import SigmaError


def test_local_paths_and_file_urls(tmp_path):
    a = storage.resolve(str(tmp_path / "x"))
    assert a.is_local and a.path == str(tmp_path / "x") and str(a) == str(tmp_path / "x")
    assert storage.resolve(f"file://{tmp_path}/x") == a
    assert (a / "y/z.tar").name == "z.tar" and (a / "y/z.tar").parent.parent == a


@pytest.mark.parametrize(
    "text, says",
    [
        ("s3:/bucket/cur", "'//' lost"),
        ("hf://datasets/x", "hf:// is not supported"),
        ("https://example.com/out", "https:// is not supported"),
        ("memory://x", "memory:// is not supported"),
        ("s3://", "no bucket"),
    ],
)
def test_refused_schemes_never_become_folders(text, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SigmaError, match=says):
        storage.resolve(text)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url, package", [("gs://b/x", "gcsfs"), ("az://c/x", "adlfs"), ("abfs://c/x", "adlfs")])
def test_missing_backend_names_its_package(url, package):
    pytest.importorskip("s3fs")
    try:
        __import__(package)
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    with pytest.raises(SigmaError, match=f"needs the package {package}"):
        storage.resolve(url)


def test_credentials_in_config_refused():
    with pytest.raises(SigmaError, match="storage.s3.secret_access_key: credentials do not belong"):
        storage.resolve("s3://b/x", {"s3": {"secret_access_key": "x"}})


def test_bucket_read_write_list_and_pickle(bucket):
    root = storage.resolve(bucket + "/out/")
    assert str(root) == bucket + "/out" and not root.exists()
    atomic.write_text(root / "a.txt", "hello")
    atomic.write_bytes(root / "sub/b.bin", bytes(range(256)))
    with atomic.atomic_path(root / "c.parquet") as tmp:
        tmp.write_bytes(b"PAR1")
    assert (root / "a.txt").read_text() == "hello"
    assert (root / "sub/b.bin").read_range(10, 5) == bytes(range(10, 15))
    assert (root / "sub/b.bin").size() == 256 and (root / "sub").is_dir() and (root / "a.txt").is_file()
    assert [x.name for x in root.iterdir()] == ["a.txt", "c.parquet", "sub"]
    assert [x.name for x in root.files()] == ["a.txt", "c.parquet", "b.bin"]
    info = (root / "a.txt").info()
    assert info["size"] == 5 and info["etag"]
    atomic.write_text(root / "a.txt", "hellO")
    assert (root / "a.txt").info()["etag"] != info["etag"]  # same size, new content: a fingerprint sees it
    again = pickle.loads(pickle.dumps(root / "a.txt"))  # what a Ray task receives
    assert again.read_text() == "hellO"
    (root / "sub").rmtree()
    assert not (root / "sub/b.bin").exists()


def test_braces_and_globs_on_bucket_and_disk(bucket, tmp_path):
    for base in (storage.resolve(bucket), storage.resolve(str(tmp_path))):
        for i in range(4):
            atomic.write_bytes(base / f"d/{i:05d}.tar", b"x")
        atomic.write_bytes(base / "d/notes.txt", b"x")
        names = [x.name for x in storage.expand(f"{base}/d/{{00001..00002}}.tar")]
        assert names == ["00001.tar", "00002.tar"]
        assert [x.name for x in storage.expand(f"{base}/d/*.tar")] == [f"{i:05d}.tar" for i in range(4)]
        assert storage.expand(f"{base}/d/*.jpg") == []
        assert [x.name for x in storage.expand(f"{base}/d/0000[0-1].tar")] == ["00000.tar", "00001.tar"]


def test_writer_appears_whole_or_not_at_all(bucket):
    dest = storage.resolve(bucket) / "big.tar"
    chunk = b"z" * (6 << 20)  # past s3fs' 5 MiB block: a multipart upload
    with pytest.raises(RuntimeError), storage.writer(dest) as f:
        f.write(chunk)
        f.write(chunk)
        assert not dest.exists()  # parts uploaded, nothing visible
        raise RuntimeError("killed mid-write")
    assert not dest.exists()
    with storage.writer(dest) as f:
        f.write(chunk)
        f.write(b"end")
    assert dest.size() == len(chunk) + 3


def test_staging_commits_by_marker(bucket, tmp_path):
    for base in (storage.resolve(bucket), storage.resolve(str(tmp_path))):
        folder = base / "edges"
        with pytest.raises(RuntimeError), storage.staging(folder) as tmp:
            atomic.write_bytes(tmp / "part-0", b"a")
            raise RuntimeError
        assert not storage.committed(folder)
        with storage.staging(folder) as tmp:
            atomic.write_bytes(tmp / "part-0", b"a")
            assert not storage.committed(folder)
        assert storage.committed(folder) and (folder / storage.MARKER).exists()
        assert (folder / "part-0").read_bytes() == b"a"


def test_local_folder_from_before_markers_counts_as_committed(tmp_path):
    old = tmp_path / "dedup"
    old.mkdir()
    (old / "edges.parquet").write_bytes(b"x")
    assert storage.committed(storage.resolve(str(old)))


def test_missing_bucket_and_key(s3_server):
    missing = storage.resolve("s3://no-such-bucket-sigmaforge/x.parquet")
    assert not missing.exists()
    with pytest.raises(FileNotFoundError):
        missing.read_bytes()


def test_throttling_and_dropped_connections_are_retried_and_counted(bucket, s3_counted):
    """503 SlowDown and a connection closed unanswered: botocore retries them with backoff, and each retry
    is counted by its cause (what a stage's stats report)."""
    loc = storage.resolve(f"{bucket}/x.bin")
    storage.take_retries()
    s3_counted.fail("PUT", 3, "slowdown")
    loc.write_object(b"abc")
    assert storage.take_retries() == {"throttled": 3, "server_errors": 0, "dropped": 0}
    assert s3_counted.count("PUT") == 4
    s3_counted.fail("GET", 2, "drop")
    assert loc.read_bytes() == b"abc"
    # aiohttp itself resends a request once when a reused connection turns out closed: botocore sees 1 or 2
    assert storage.take_retries()["dropped"] in (1, 2)
    assert s3_counted.count("GET") == 3
    assert storage.take_retries() == {"throttled": 0, "server_errors": 0, "dropped": 0}


def test_infos_of_a_folder_cost_one_listing_not_a_head_each(bucket, s3_counted):
    """fingerprint.listing's stats: sizes and ETags from one LIST, the same as each object's HEAD gives."""
    locs = [storage.resolve(f"{bucket}/d/{i}.bin") for i in range(5)]
    for i, loc in enumerate(locs):
        loc.write_object(b"x" * i)
    missing = storage.resolve(f"{bucket}/d/missing.bin")
    s3_counted.requests.clear()
    got = storage.infos([*locs, missing])
    assert s3_counted.count("GET") == 1 and s3_counted.count("HEAD") == 1  # the listing; the missing one's HEAD
    assert got == {loc: loc.info() for loc in locs}
