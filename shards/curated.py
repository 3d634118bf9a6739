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
with two zero blocks, and a shard without them is refused as truncated. Shards are read on disk or
in a bucket (a Loc, or a path / URL resolved with default storage options): one streamed pass.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

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


Where = str | Path | storage.Loc


def _loc(path: Where) -> storage.Loc:
    return path if isinstance(path, storage.Loc) else storage.resolve(path)


def _members(
    path: storage.Loc, tar: tarfile.TarFile, read: Callable[[str], bool]
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
    if path.size() < tar.offset + 2 * tarfile.BLOCKSIZE:
        raise CorruptShard(
            f"{path}: truncated after {len(done) + (key is not None)} samples (no end-of-archive blocks)"
        )


@contextlib.contextmanager
def _open(path: storage.Loc) -> Iterator[tarfile.TarFile]:
    """The tar opened for reading: a local file, or one streamed read of the object (seeks skip data)."""
    with contextlib.ExitStack() as stack:
        try:
            f: IO[bytes] | None = None if path.is_local else stack.enter_context(path.open("rb"))
            tar = tarfile.open(path.path, "r:") if f is None else tarfile.open(fileobj=f, mode="r:")
        except _READ_ERRORS as e:
            raise CorruptShard(f"{path}: not a readable tar ({type(e).__name__}: {e})") from None
        with tar:
            yield tar


def keys(path: Where) -> list[str]:
    """Sample keys in member order, from the headers only; CorruptShard unless the tar is whole."""
    path = _loc(path)
    out: dict[str, None] = {}
    try:
        with _open(path) as tar:
            for key, _, _ in _members(path, tar, read=lambda k: False):
                out.setdefault(key, None)
    except CorruptShard as e:
        e.keys = list(out)
        raise
    except _READ_ERRORS as e:
        err = CorruptShard(f"{path}: corrupt tar after {len(out)} samples ({type(e).__name__}: {e})")
        err.keys = list(out)
        raise err from None
    return list(out)


def samples(path: Where, only: set[str] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample (or per key in `only`), one in memory at a time; CorruptShard as `keys`."""
    path = _loc(path)
    wanted = (lambda k: True) if only is None else only.__contains__
    key, n = "", 0
    members: dict[str, bytes] = {}
    try:
        with _open(path) as tar:
            for k, ext, data in _members(path, tar, read=wanted):
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


def read_member(src: Where, offset: int, size: int, options: Any = None) -> bytes:
    """The served bytes of one downloaded image, from its place in a download tar: one ranged read (a
    ranged GET on a bucket). `src` as recorded (a path or URL string, resolved with `options`, the
    `storage` config section), or a Loc."""
    loc = src if isinstance(src, storage.Loc) else storage.resolve(src, options)
    return loc.read_range(offset, size)


def meta_json(meta: dict[str, Any]) -> str:
    """A sample's KEY.json text (sorted keys: the same row gives the same bytes)."""
    return json.dumps(meta, sort_keys=True, default=str)


def write_shard(path: Where, members: list[dict[str, Any]], options: Any = None) -> str:
    """members: {key, src, offset, size, ext, meta (dict or its meta_json), caption (str|None)}; returns the path.
    `options`: the `storage` config section the members' `src` are resolved with. Streamed: on a bucket a
    multipart upload completed at the end, nothing on local disk."""
    path = _loc(path)
    if path.has_file():
        return str(path)
    with storage.writer(path) as f, tar_writer.open_for_writing(f) as tar:
        for m in sorted(members, key=lambda m: m["key"]):
            meta = m["meta"] if isinstance(m["meta"], str) else meta_json(m["meta"])
            files = {m["ext"]: read_member(m["src"], m["offset"], m["size"], options), META_EXT: meta.encode()}
            if m.get("caption"):
                files[CAPTION_EXT] = str(m["caption"]).encode()
            for ext in sorted(files):
                tar_writer.add(tar, f"{m['key']}.{ext}", files[ext])
    return str(path)
