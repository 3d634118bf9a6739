"""Atomic writes: all or nothing, readable by others, temp files cleaned."""

import os

import pytest

from shards import atomic, storage


def test_atomic_write_is_all_or_nothing(tmp_path):
    target = tmp_path / "a" / "out.txt"
    atomic.write_text(target, "first")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]  # no temp left behind
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o666 & ~storage._UMASK)


def test_clean_temp_removes_leftovers(tmp_path):
    (tmp_path / ".x.parquet.abc.tmp").write_text("partial")
    (tmp_path / "keep.parquet").write_text("done")
    assert atomic.clean_temp(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["keep.parquet"]


def test_a_full_disk_is_one_line_for_disk_and_bucket_destinations(small_disk, bucket, monkeypatch):
    """One rule for local temp files (storage.temp_file): a full disk names the file, nothing is left or put."""
    import tempfile

    from shards.errors import SigmaError

    disk = small_disk(256 << 10)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # a bucket destination's temp file is in TMPDIR
    for dest in (storage.resolve(str(disk / "out.bin")), storage.resolve(f"{bucket}/out.bin")):
        with pytest.raises(SigmaError, match="disk full"), atomic.atomic_path(dest) as tmp:
            tmp.write_bytes(b"x" * (1 << 20))
        assert not dest.has_file() and list(disk.iterdir()) == []
