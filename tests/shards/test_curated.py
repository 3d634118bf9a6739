"""shards/curated.py: the one reader of curated tars (keys, duplicates, truncation), and its callers."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from common import pages
from encoding import actors
from shards import curated, reasons
from tests.shards.synthetic import image_bytes


def write_tar(path: Path, names: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, name in enumerate(names):
            data = image_bytes(32, 32, i) if name.endswith(".jpg") else f"text of {name}".encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def cut_after(path: Path, n_members: int) -> None:
    """Cut the tar right after its n-th member's data: a valid-looking shorter archive."""
    with tarfile.open(path) as tar:
        m = tar.getmembers()[n_members - 1]
    path.write_bytes(path.read_bytes()[: m.offset_data + -(-m.size // 512) * 512])


def test_keys_are_member_paths_minus_the_extension(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", ["a/x.jpg", "a/x.txt", "b/x.jpg", "b/x.txt", "y.seg.jpg"])
    assert curated.keys(tar) == ["a/x", "b/x", "y"]
    assert [(k, sorted(m)) for k, m in curated.samples(tar)] == [
        ("a/x", ["jpg", "txt"]),
        ("b/x", ["jpg", "txt"]),
        ("y", ["seg.jpg"]),
    ]
    assert list(pages.tar_images(tar, {"b/x"})) == ["b/x"]


@pytest.mark.parametrize(
    "names, what",
    [(["x.jpg", "y.jpg", "x.txt"], "duplicate key 'x'"), (["x.jpg", "x.jpg"], "duplicate member 'x.jpg'")],
)
def test_a_duplicate_key_is_an_error_naming_the_shard(tmp_path, names, what):
    tar = write_tar(tmp_path / "00003.tar", names)
    for read in (curated.keys, lambda p: list(curated.samples(p))):
        with pytest.raises(curated.CorruptShard, match=what) as e:
            read(tar)
        assert str(tar) in str(e.value) and "\n" not in str(e.value)


def test_a_tar_cut_at_a_member_boundary_is_corrupt(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", ["x.jpg", "x.txt", "y.jpg", "y.txt"])
    cut_after(tar, 2)
    with tarfile.open(tar) as t:
        assert len(t.getmembers()) == 2  # tarfile alone reads it as a complete, shorter archive
    with pytest.raises(curated.CorruptShard, match="truncated after 1 samples") as e:
        curated.keys(tar)
    assert e.value.keys == ["x"]
    with pytest.raises(curated.CorruptShard, match="truncated"):
        list(curated.samples(tar))


def test_encode_keeps_same_named_files_in_two_folders_apart(tmp_path):
    tar = write_tar(tmp_path / "00000.tar", ["a/x.jpg", "a/x.txt", "b/x.jpg", "b/x.txt"])
    rows = list(
        actors.read_shard(
            {"shard": str(tar), "captions": {"recaption": str(tmp_path / "none.parquet")}, "derived": {}, "done": []},
            "256",
        )
    )
    assert sorted(r["key"] for r in rows) == ["a/x", "b/x"]
    dup = write_tar(tmp_path / "00001.tar", ["x.jpg", "y.jpg", "x.txt"])
    rows = list(
        actors.read_shard(
            {"shard": str(dup), "captions": {"recaption": str(tmp_path / "none.parquet")}, "derived": {}, "done": []},
            "256",
        )
    )
    assert {r["reason"] for r in rows} == {reasons.CORRUPT_SHARD}
