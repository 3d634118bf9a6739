"""The curated-tar format (CURDIR/shards/NNNNN.tar, names in shards/format.py): its one reader, its
one writer, and the offset reader of a downloaded image's bytes.

Writer: members sorted by key (Ray's WebDataset reader mis-groups out-of-order members), with fixed
tar headers (`shards/tar_writer.py`), so the same inputs give byte-identical shards. The image bytes
are read straight from the download tar at their recorded offset (`read_member`: one ranged read,
a ranged GET on a bucket): they never pass through the curation driver. A shard appears under its
final name only when complete (on disk temp + rename; on a bucket a multipart upload completed at the
end, shards/storage.py); an existing shard is finished work and is never rewritten.

Reader: a sample's key is its member path minus the extension (WebDataset: up to the first dot of the
file name), so `a/x.jpg` and `b/x.jpg` are two samples. A key whose members are not consecutive,
or a member given twice, is a duplicate: the shard is refused rather than two samples merged.
`tarfile` reads a tar cut at a member boundary as a shorter valid archive; a complete tar ends
with two zero blocks, and a shard without them is refused as truncated.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shards import storage, tar_writer
from shards.errors import SigmaError
from shards.format import CAPTION_EXT, META_EXT

_READ_ERRORS = (tarfile.TarError, EOFError, OSError)


class CorruptShard(SigmaError):
    """A curated tar that cannot be read whole: callers skip it (reason corrupt_shard) and go on.
    `keys` holds the keys read before the fault, so their samples can still be reported."""

    keys: list[str] = []


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: 'a/x.seg.jpg' -> ('a/x', 'seg.jpg')."""
    folder, sep, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + sep + stem, ext


Source = str | Path | storage.Loc  # a curated tar on disk or in a bucket (read in one streamed pass)


def _members(
    path: Source, tar: tarfile.TarFile, size: int, read: Callable[[str], bool]
) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, ext, bytes or None) per file member, checking keys are unique and the archive complete."""
    done: set[str] = set()
    key: str | None = None
    exts: set[str] = set()
    for member in tar:
        if not member.isfile():
            continue
        k, ext = split_name(member.name)
        if k != key:
            if k in done:
                raise CorruptShard(f"{path}: duplicate key {k!r} (its members are not consecutive)")
            if key is not None:
                done.add(key)
            key, exts = k, set()
        if ext in exts:
            raise CorruptShard(f"{path}: duplicate member {member.name!r}")
        exts.add(ext)
        f = tar.extractfile(member) if read(k) else None  # a file member always has a reader
        yield k, ext, f.read() if f is not None else None
    if size < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise CorruptShard(
            f"{path}: truncated after {len(done) + (key is not None)} samples (no end-of-archive blocks)"
        )


@contextlib.contextmanager
def _open(path: Source) -> Iterator[tuple[tarfile.TarFile, int]]:
    """The tar and its size in bytes; a bucket object is streamed (read-ahead GETs, no per-member requests)."""
    loc = path if isinstance(path, storage.Loc) else storage.resolve(path)
    try:
        f = loc.open("rb")
    except _READ_ERRORS as e:
        raise CorruptShard(f"{path}: not a readable tar ({type(e).__name__}: {e})") from None
    with f:
        try:
            size = f.seek(0, 2)
            f.seek(0)
            tar = tarfile.open(fileobj=f, mode="r:")
        except _READ_ERRORS as e:
            raise CorruptShard(f"{path}: not a readable tar ({type(e).__name__}: {e})") from None
        with tar:
            yield tar, size


def keys(path: Source) -> list[str]:
    """Sample keys in member order, from the headers only; CorruptShard unless the tar is whole."""
    out: dict[str, None] = {}
    try:
        with _open(path) as (tar, size):
            for key, _, _ in _members(path, tar, size, read=lambda k: False):
                out.setdefault(key, None)
    except CorruptShard as e:
        e.keys = list(out)
        raise
    except _READ_ERRORS as e:
        err = CorruptShard(f"{path}: corrupt tar after {len(out)} samples ({type(e).__name__}: {e})")
        err.keys = list(out)
        raise err from None
    return list(out)


def samples(path: Source, only: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample (or per key in `only`), one in memory at a time; CorruptShard as `keys`."""
    wanted = (lambda k: True) if only is None else only.__contains__
    key, n = "", 0
    members: dict[str, bytes] = {}
    try:
        with _open(path) as (tar, size):
            for k, ext, data in _members(path, tar, size, read=wanted):
                if data is None:
                    continue
                if k != key and members:
                    yield key, members
                    members, n = {}, n + 1
                key, members[ext] = k, data
    except CorruptShard:
        raise
    except _READ_ERRORS as e:
        raise CorruptShard(f"{path}: corrupt tar after {n} samples ({type(e).__name__}: {e})") from None
    if members:
        yield key, members


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------


def read_member(src: Source, offset: int, size: int, options: Any = None) -> bytes:
    """The served bytes of one downloaded image, from its place in a download tar: one ranged read (a
    ranged GET on a bucket). `src` as recorded (a path or URL string, resolved with `options`, the
    `storage` config section), or a Loc."""
    loc = src if isinstance(src, storage.Loc) else storage.resolve(src, options)
    return loc.read_range(offset, size)


def meta_json(meta: dict[str, Any]) -> str:
    """A sample's KEY.json text (sorted keys: the same row gives the same bytes)."""
    return json.dumps(meta, sort_keys=True, default=str)


def write_shard(path: Source, members: list[dict[str, Any]], options: Any = None) -> str:
    """members: {key, src, offset, size, ext, meta (dict or its meta_json), caption (str|None)}; returns the path.
    `options`: the `storage` config section the members' `src` are resolved with. Streamed: on a bucket a
    multipart upload completed at the end, nothing on local disk."""
    path = path if isinstance(path, storage.Loc) else storage.resolve(path)
    if path.has_file():
        return str(path)
    members = sorted(members, key=lambda m: m["key"])
    src = {m["src"]: storage.resolve(m["src"], options) for m in members}
    # a bucket's images come in few ranged GETs (neighbours coalesced), not one per image
    reader = storage.RangeReader((src[m["src"]], m["offset"], m["size"]) for m in members)
    with storage.writer(path) as f, tar_writer.open_for_writing(f) as tar:
        for m in members:
            meta = m["meta"] if isinstance(m["meta"], str) else meta_json(m["meta"])
            files = {m["ext"]: reader.read(src[m["src"]], m["offset"], m["size"]), META_EXT: meta.encode()}
            if m.get("caption"):
                files[CAPTION_EXT] = str(m["caption"]).encode()
            for ext in sorted(files):
                tar_writer.add(tar, f"{m['key']}.{ext}", files[ext])
    return str(path)
