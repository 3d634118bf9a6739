"""Images already stored, on disk or in a bucket, as a curation input (`--images SPEC`): WebDataset /
img2dataset shards, a folder tree of images, or a parquet / Hugging Face `datasets` table with an
image-bytes column.

The kind is read from the path: `*.tar`, a brace pattern or glob of tars, or a folder holding tars
-> shards; a `.parquet` / `.arrow` file, or a folder of them whose schema has an image column (bytes,
or `datasets`' Image feature: a {bytes, path} struct) -> table; any other folder -> a folder of images.

They go through exactly the downloaded images' path. `split` writes the same keyed input shards
as a URL list (`_work/input/NNNNN.parquet`: key, url, caption, `source` naming the item, carried
columns) and beside each `_work/where/NNNNN.parquet`: where each item's bytes lie (src, offset,
size). `shard_rows` (the Ray task that would download) hands those rows on: straight into the
user's tar (member offsets) or file (offset 0); a table's bytes are first copied into
`downloads/NNNNN.tar`, the run's own file, freed after the write step like a download tar. The
user's files are only ever read.

In a bucket (`s3://...`, through shards/storage.py) a tar is read in streamed passes, never a request
per member: the split reads it once (headers and the small members; `STREAM_BLOCK` bytes per GET),
the task that would download reads it once more and hands each image's bytes on in its row (`data`),
and the write step reads only the kept images back (coalesced ranges). Nothing of the user's tars is
copied into the output unless the image is kept. A folder of images is one listing.

    shards   one input shard per tar; sample = members sharing a key (WebDataset); image = its
             .jpg/.png/.webp/... member; caption = .txt (else the .json's `caption`); the .json's
             other fields are carried (img2dataset's bookkeeping dropped, its `url` kept as url)
             source = TAR::MEMBER
    folder   every image file under the folder (sorted paths), `download.shard_size` per input shard;
             caption = a same-stem .txt beside it; source = the file's path
    table    `download.shard_size` rows per input shard; caption/url columns found as in a URL list,
             other columns carried; source = TABLE#ROW

Every item is accounted for, on every kind of disk (a row with a reason, never dropped, and the run
goes on): a file that is not regular (FIFO, socket, device) is `special_file` and never opened (its
type is read with stat first: a read could block forever); one the process may not read, or a folder
it may not list, is `unreadable`; a link whose target is missing or a loop is `unresolved_link`. Links
are followed, also when they leave the input folder (a Hugging Face cache snapshot is links into
`blobs/`), and so is a table cell's absolute `{bytes, path}`. In a tar, a symlink or hardlink member
is followed when it points to a file member of the same tar (else `unresolved_link`: a tar never
makes the run read outside it); a sample holds one image, so a name given twice (or a second image
with the same key) starts another sample, named `TAR::MEMBER#2`. Captions (`.txt`) are UTF-8;
others are decoded as cp1252 (then latin-1, where cp1252 leaves a byte undefined), counted in
`_work/input/captions.json` -> stats.json `captions_not_utf8`: never replaced with U+FFFD.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import posixpath
import stat
import tarfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import inputs
from shards import atomic, curated, fingerprint, reasons, storage
from shards.errors import SigmaError
from shards.storage import Loc

WHERE = "where"  # _work/where/NNNNN.parquet
SPLIT_THREADS = 8  # bucket tars the split reads at once
STREAM_BLOCK = 32 << 20  # bytes per GET when a bucket tar is streamed: a 1 GB tar is ~32 requests
SMALL_MEMBER = 1 << 20  # a bucket tar's non-image members up to this size are kept as they stream past
CAPTIONS = "captions.json"  # _work/input/captions.json: how many captions were not UTF-8, by the codec read
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"}  # gif/bmp/tiff: `unsupported_format`
IMAGE_NAMES = ("image", "img", "jpg", "png", "webp", "image_bytes", "bytes")
# img2dataset's own fields in each sample's .json: what it did, not what the sample carries
I2D_FIELDS = {
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "exif",
    "sha256",
    "url",
    "caption",
    "sf_key",
}
WHERE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("reason", pa.string()),
        ("src", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("row", pa.int64()),
    ]
)


@dataclass(frozen=True)
class LocalImages:
    """Stored images (on disk or in a bucket), resolved once: the kind and files (tars; tables; or the
    folder itself) and, for a table, the image and caption columns. The same methods as inputs.UrlList."""

    spec: str
    kind: str  # "shards" | "folder" | "table"
    files: tuple[Loc, ...]
    image_col: str | None = None
    caption_col: str | None = None
    url_col: str | None = None
    words = ("source shard", "images")  # what the progress lines call a shard and its items: no download

    def describe(self) -> dict:
        """What --dry-run prints (from names and headers only: no image is read)."""
        plan = {"images": self.spec, "kind": self.kind, "files": len(self.files)}
        if self.kind == "table":
            plan.update(
                rows=sum(_table_rows(f) for f in self.files),
                image_col=self.image_col,
                caption_col=self.caption_col,
                url_col=self.url_col,
            )
        return plan

    def fingerprint(self) -> dict:
        """The input files' names, sizes and content (fingerprint.listing: too many to hash whole)."""
        if self.kind == "folder" and not self.files[0].is_local:
            return {"--images": f"{self.kind} {_listing_of_objects(self.files[0])}"}
        files = self._item_files() if self.kind == "folder" else list(self.files)
        return {"--images": f"{self.kind} {fingerprint.listing(files)}"}

    def _item_files(self) -> list[Loc]:
        """Every image file under the folder (links followed, each real folder walked once), and each
        folder that could not be listed (an item of its own: `unreadable`), sorted by path. In a bucket:
        every image object under the prefix, from one listing."""
        if not self.files[0].is_local:
            return sorted(f for f in _bucket_listing(self.files[0]) if _ext(f.name) in IMAGE_EXTS)
        root = self.files[0].local
        out: list[Path] = []
        walked: set[tuple[int, int]] = set()
        for folder, dirs, names in os.walk(root, onerror=lambda e: out.append(Path(e.filename)), followlinks=True):
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in walked:  # a link back to a folder already walked: a loop
                dirs[:] = []
                continue
            walked.add((st.st_dev, st.st_ino))
            dirs.sort()
            out += [Path(folder) / n for n in sorted(names) if _ext(n) in IMAGE_EXTS]
        return [Loc("", str(p)) for p in sorted(out, key=lambda p: str(p.relative_to(root)))]

    def split(self, work: Path | Loc, shard_size: int) -> int:
        """Keyed input shards + where each item's bytes lie; done once (`.complete`), like a URL list."""
        work = inputs.as_loc(work)
        done = work / ".complete"
        if done.has_file():
            return int(done.read_text())
        work.mkdir()
        out = _Shards(work, self._schema())
        if self.kind == "shards":
            for items in _each_tar(self.files):
                for item, where in items:
                    out.add(item, where)
                out.flush()  # one input shard per user tar: the tar is the unit of work
        elif self.kind == "folder":
            sizes = None if self.files[0].is_local else _bucket_listing(self.files[0])
            for path in self._item_files():
                out.add(*(_file_item(path.local) if sizes is None else _object_item(path, sizes)))
                if out.full(shard_size):
                    out.flush()
        else:
            for table in self.files:
                for item, where in _table_items(table, self, shard_size):
                    out.add(item, where)
                    if out.full(shard_size):
                        out.flush()
        out.flush()
        if out.rows == 0:
            raise SigmaError(f"{self.spec}: no images found")
        atomic.write_text(work / CAPTIONS, json.dumps({"captions_not_utf8": dict(out.decoded)}) + "\n")
        atomic.write_text(done, str(out.shards))
        return out.shards

    def _schema(self) -> pa.Schema | None:
        """The input shards' columns: fixed before the first row, so every shard has the same."""
        base = [("key", pa.string()), ("url", pa.string()), ("caption", pa.string()), ("source", pa.string())]
        if self.kind == "folder":
            return pa.schema(base)
        if self.kind == "shards":
            return None  # from the first sample's .json (img2dataset writes the same fields for every sample)
        skip = (self.image_col, self.caption_col, self.url_col)
        table = _table_schema(self.files[0])
        return pa.schema(base + [(inputs.input_name(f.name, None, None), f.type) for f in table if f.name not in skip])

    def shard_rows(self, work: Path | Loc, downloads: Path | Loc, shard: int, cur) -> Iterator[dict]:
        """Rows saying where each item's bytes lie (what a download shard yields); a table's bytes
        are copied first into `downloads/NNNNN.tar` (the run's own file). A bucket tar's images come
        in their rows (`data`), read in one streamed pass of the tar, in member order."""
        with (inputs.as_loc(work) / WHERE / f"{shard:05d}.parquet").open("rb") as f:
            rows = pq.read_table(f).to_pylist()
        if self.kind == "table":
            rows = _copy_table_bytes(rows, self.image_col, inputs.as_loc(downloads) / f"{shard:05d}.tar", self.files)
        if self.kind == "shards" and not self.files[0].is_local:
            yield from _with_bytes(rows, self.files)
            return
        for r in rows:
            del r["row"]
            yield r


class _Shards:
    """Accumulates items and writes input shard + where file pairs, keys numbered across the input."""

    def __init__(self, work: Loc, schema: pa.Schema | None):
        self.work, self.schema = work, schema
        self.items: list[dict] = []
        self.wheres: list[dict] = []
        self.rows = self.shards = 0
        self.decoded: Counter[str] = Counter()  # captions that were not UTF-8, by the codec that read them

    def add(self, item: dict, where: dict) -> None:
        codec = item.pop(_CODEC, None)
        if codec:
            self.decoded[codec] += 1
        key = f"{self.rows + len(self.items):0{inputs.KEY_DIGITS}d}"
        self.items.append({"key": key, **item})
        self.wheres.append({"key": key, "url": item.get("url") or "", **where})

    def full(self, size: int) -> bool:
        return len(self.items) >= size

    def flush(self) -> None:
        if not self.items:
            return
        if self.schema is None:
            self.schema = _schema_of(self.items[0])
        table = pa.Table.from_pylist([_coerce(i, self.schema) for i in self.items], self.schema)
        (self.work.parent / WHERE).mkdir()
        atomic.write_parquet(
            self.work.parent / WHERE / f"{self.shards:05d}.parquet", pa.Table.from_pylist(self.wheres, WHERE_SCHEMA)
        )
        atomic.write_parquet(self.work / f"{self.shards:05d}.parquet", table)
        self.rows += len(self.items)
        self.shards += 1
        self.items, self.wheres = [], []


def _ext(name: str) -> str:
    return name.rpartition(".")[2].lower() if "." in name else ""


# ---------------------------------------------------------------------------------------------
# What a file on disk is, before it is opened; captions decoded by a stated rule
# ---------------------------------------------------------------------------------------------

_CODEC = "_caption_codec"  # an item's caption codec when not UTF-8 (counted by _Shards, not a column)


def local_problem(path: str | Path) -> str | None:
    """Why a file on disk cannot give an item's bytes (a reason code), or None: read its type with stat
    first (links followed) and open only a regular file, once, to see that this process may read it."""
    try:
        st = os.stat(path)
    except OSError as e:  # missing or a loop behind a link; a folder on the way not searchable
        if os.path.islink(path) and e.errno in (errno.ENOENT, errno.ELOOP):
            return reasons.UNRESOLVED_LINK
        return reasons.UNREADABLE
    if not stat.S_ISREG(st.st_mode):
        return reasons.SPECIAL_FILE  # a FIFO, socket or device: never opened (a read could block)
    try:
        with open(path, "rb"):
            return None
    except OSError:
        return reasons.UNREADABLE


def decode_caption(data: bytes) -> tuple[str, str | None]:
    """(text, codec when not UTF-8): UTF-8 (a BOM read as nothing), else cp1252 (Windows' Western
    European, a superset of latin-1's letters), else latin-1 (every byte a character): never U+FFFD."""
    try:
        return data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), "cp1252"
    except UnicodeDecodeError:  # 0x81 0x8D 0x8F 0x90 0x9D are undefined in cp1252
        return data.decode("latin-1"), "latin-1"


def _failed(item: dict, reason: str) -> tuple[dict, dict]:
    """An item accounted for with its reason: no bytes to read."""
    return item, {"reason": reason, "src": "", "offset": 0, "size": 0, "row": -1}


def _schema_of(item: dict) -> pa.Schema:
    """Input shard columns for tar samples: the base ones + the first sample's carried .json fields."""
    types = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string()}
    return pa.schema(
        [
            (k, types.get(type(v), pa.string())) if k not in ("key", "url", "caption", "source") else (k, pa.string())
            for k, v in item.items()
        ]
    )


def _coerce(item: dict, schema: pa.Schema) -> dict:
    """A value that does not fit its column's type (a field that changed type mid-input) becomes text."""
    out = {}
    for f in schema:
        v = item.get(f.name)
        if v is None or f.type == pa.string():
            out[f.name] = v if v is None or isinstance(v, str) else json.dumps(v)
        elif f.type == pa.bool_():
            out[f.name] = v if isinstance(v, bool) else None
        elif f.type == pa.int64():
            out[f.name] = v if isinstance(v, int) and not isinstance(v, bool) else None
        elif f.type == pa.float64():
            out[f.name] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        else:
            out[f.name] = v
    return out


# ---------------------------------------------------------------------------------------------
# Shards: samples of a WebDataset tar, from its headers (+ the small .txt/.json members)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_tar(tar: Loc) -> Iterator[tarfile.TarFile]:
    """A user's tar for one pass over its members: on disk read with seeks (headers only, data skipped);
    in a bucket one streamed read (`r|`: no seek, so no request per member)."""
    with contextlib.ExitStack() as stack:
        try:
            if tar.is_local:
                t = tarfile.open(tar.path, "r:")
            else:
                t = tarfile.open(fileobj=stack.enter_context(_stream(tar)), mode="r|")
        except (tarfile.TarError, OSError) as e:
            raise SigmaError(
                storage.failure(tar, e) or f"{tar}: not a readable tar ({type(e).__name__}: {e})"
            ) from None
        with t:
            yield t


def _stream(loc: Loc) -> IO[bytes]:
    """A bucket object read front to back: `STREAM_BLOCK` bytes per GET (read-ahead), never a GET per read."""
    return loc.open("rb", block_size=STREAM_BLOCK, cache_type="readahead")


def _tar_items(tar_path: Loc) -> Iterator[tuple[dict, dict]]:
    problem = local_problem(tar_path.path) if tar_path.is_local else None
    if problem:  # the whole tar is one row: its members cannot be listed
        yield _failed({"url": None, "caption": None, "source": str(tar_path)}, problem)
        return
    small: dict[int, bytes] = {}  # a bucket tar's small non-image members, by data offset: a stream cannot seek back
    with _open_tar(tar_path) as tar:
        try:
            members = []
            for m in tar:
                if m.isdir():
                    continue
                members.append(m)  # headers only (on disk the data is skipped by a seek)
                if not tar_path.is_local and m.isfile() and m.size <= SMALL_MEMBER and _ext(m.name) not in IMAGE_EXTS:
                    small[m.offset_data] = tar.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SigmaError(
                f"{tar_path}: corrupt tar after {len(tar.members)} members ({type(e).__name__}: {e})"
            ) from None

        def read(m: tarfile.TarInfo) -> bytes:
            if tar_path.is_local:
                return tar.extractfile(m).read()
            data = small.get(m.offset_data)
            return data if data is not None else tar_path.read_range(m.offset_data, m.size)

        by_name = {posixpath.normpath(m.name): m for m in members}
        for occurrence, members_of in _samples(members):
            yield _tar_sample(read, tar_path, occurrence, members_of, by_name)


def _samples(members: list[tarfile.TarInfo]) -> Iterator[tuple[int, dict[str, tarfile.TarInfo]]]:
    """(occurrence of its key, {ext: member}) per sample, in member order: members sharing a key
    (WebDataset), one image each; an extension already in the key's latest sample, or a second image,
    starts another sample of that key (a name given twice keeps both)."""
    samples: list[tuple[int, dict[str, tarfile.TarInfo]]] = []
    latest: dict[str, int] = {}  # key -> index of its latest sample
    for m in members:
        key, ext = curated.split_name(m.name)
        ext = ext.lower()
        i = latest.get(key)
        if i is not None:
            parts = samples[i][1]
            if ext in parts or (ext in IMAGE_EXTS and any(e in IMAGE_EXTS for e in parts)):
                i = None
        if i is None:
            samples.append((1 if key not in latest else samples[latest[key]][0] + 1, {}))
            i = latest[key] = len(samples) - 1
        samples[i][1][ext] = m
    yield from samples


def _in_tar(m: tarfile.TarInfo, by_name: dict[str, tarfile.TarInfo]) -> tarfile.TarInfo | str:
    """The regular file member a member stands for (itself, or a link's target in the same tar), else
    the reason: `unresolved_link` (target outside the tar, absent, or a loop), `special_file`."""
    seen: set[str] = set()
    while m.issym() or m.islnk():
        if m.name in seen:
            return reasons.UNRESOLVED_LINK
        seen.add(m.name)
        if m.issym() and posixpath.isabs(m.linkname):
            return reasons.UNRESOLVED_LINK
        base = posixpath.dirname(m.name) if m.issym() else ""  # a hardlink names an archive path
        name = posixpath.normpath(posixpath.join(base, m.linkname))
        if name == ".." or name.startswith("../") or name not in by_name:
            return reasons.UNRESOLVED_LINK
        m = by_name[name]
    return m if m.isfile() else reasons.SPECIAL_FILE


def _tar_sample(read: Callable[[tarfile.TarInfo], bytes], tar_path: Loc, occurrence: int, members: dict, by_name: dict):
    """One sample's item (caption, url, carried .json fields) and where its image's bytes lie; `read`
    gives a member's bytes."""
    ext = next((e for e in members if e in IMAGE_EXTS), None)
    name = members[ext].name if ext else curated.split_name(next(iter(members.values())).name)[0]
    source = f"{tar_path}::{name}" + (f"#{occurrence}" if occurrence > 1 else "")
    files = {e: _in_tar(m, by_name) for e, m in members.items()}  # a member, or why it cannot be read
    meta = {}
    if not isinstance(files.get("json"), str) and "json" in files:
        try:
            meta = json.loads(decode_caption(read(files["json"]))[0])  # not UTF-8: read as a .txt is
        except ValueError:
            meta = {}
    meta = meta if isinstance(meta, dict) else {}
    item = {
        "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
        "caption": meta.get("caption") if isinstance(meta.get("caption"), str) else None,
        "source": source,
        **{inputs.input_name(k, None, None): v for k, v in meta.items() if k not in I2D_FIELDS},
    }
    if ext is None:  # a sample without an image member: accounted for, never usable
        return _failed(item, reasons.NOT_AN_IMAGE)
    for part in (ext, "txt"):  # the image, then its caption: a link not followed, a FIFO member
        if isinstance(files.get(part), str):
            return _failed(item, files[part])
    if "txt" in files:  # KEY.txt, else the .json's caption
        item["caption"], codec = decode_caption(read(files["txt"]))
        if codec:
            item[_CODEC] = codec
    image = files[ext]
    return item, {"reason": "", "src": str(tar_path), "offset": image.offset_data, "size": image.size, "row": -1}


def _each_tar(tars: tuple[Loc, ...]) -> Iterator[Iterable[tuple[dict, dict]]]:
    """Each tar's items, in order. Bucket tars are read `SPLIT_THREADS` at a time (a streamed read mostly
    waits on the network); their items (names, captions, carried fields: no image bytes) are held
    for at most that many tars."""
    if all(t.is_local for t in tars):
        yield from map(_tar_items, tars)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(SPLIT_THREADS) as pool:
        ahead = collections.deque(pool.submit(lambda t: list(_tar_items(t)), t) for t in tars[:SPLIT_THREADS])
        for t in tars[SPLIT_THREADS:] + (None,) * SPLIT_THREADS:
            if not ahead:
                break
            items = ahead.popleft().result()
            if t is not None:
                ahead.append(pool.submit(lambda t: list(_tar_items(t)), t))
            yield items


def _with_bytes(rows: list[dict], tars: tuple[Loc, ...]) -> Iterator[dict]:
    """A bucket shard's rows with their image bytes (`data`), read in one streamed pass of its tar: a
    row is handed on as its member passes (member order), the rows without an image first. An image
    the tar no longer holds at its recorded place (the tar was rewritten) is `not_an_image`."""
    wanted: dict[int, list[dict]] = {}
    for r in rows:
        del r["row"]
        if r["src"]:
            wanted.setdefault(r["offset"], []).append(r)
        else:
            yield {**r, "data": b""}
    if not wanted:
        return
    src = next(r["src"] for r in rows if r["src"])
    lost: list[dict] = []
    with _open_tar({str(t): t for t in tars}.get(src) or storage.resolve(src)) as tar:
        try:
            for m in tar:
                for r in wanted.pop(m.offset_data, []) if m.isfile() else []:
                    if r["size"] == m.size:
                        yield {**r, "data": tar.extractfile(m).read()}
                    else:
                        lost.append(r)
                if not wanted:
                    break  # the rest of the tar is not read
        except (tarfile.TarError, OSError, EOFError):
            pass  # what is still wanted is reported below, row by row
    for r in lost + [r for left in wanted.values() for r in left]:
        yield {**r, "reason": reasons.NOT_AN_IMAGE, "src": "", "offset": 0, "size": 0, "data": b""}


# ---------------------------------------------------------------------------------------------
# Folder: one file per image, an optional same-stem .txt caption
# ---------------------------------------------------------------------------------------------


def _file_item(path: Path) -> tuple[dict, dict]:
    """An image file (or a folder that could not be listed) and its same-stem .txt caption."""
    item: dict = {"url": None, "caption": None, "source": str(path)}
    if os.path.isdir(path):  # os.walk could not list it: its images are unknown, the folder is the row
        return _failed(item, reasons.UNREADABLE)
    txt = path.with_suffix(".txt")
    for f in (path, txt) if os.path.lexists(txt) else (path,):
        problem = local_problem(f)
        if problem:
            return _failed(item, problem)
    if os.path.lexists(txt):
        try:
            item["caption"], codec = decode_caption(txt.read_bytes())
        except OSError:  # made unreadable since it was checked
            return _failed(item, reasons.UNREADABLE)
        if codec:
            item[_CODEC] = codec
    return item, {"reason": "", "src": str(path), "offset": 0, "size": os.stat(path).st_size, "row": -1}


def _bucket_listing(root: Loc) -> dict[Loc, int]:
    """Every object under a bucket prefix and its size, from one (paged) listing."""
    found = root.fs.find(root.path, detail=True)
    return {Loc(root.scheme, name, root.options): int(i.get("size") or 0) for name, i in found.items()}


def _listing_of_objects(root: Loc) -> str:
    """`fingerprint.listing` of a bucket folder's images (name, size, ETag) from its one listing, not a
    HEAD request per image (tests/curation/test_buckets_in.py checks the two agree)."""
    h = hashlib.sha256()
    for name, i in sorted(root.fs.find(root.path, detail=True).items()):
        if _ext(name) in IMAGE_EXTS:
            tag = str(i.get("ETag") or i.get("etag")).strip('"')
            h.update(f"{name.rsplit('/', 1)[-1]}\t{int(i.get('size') or 0)}\t{tag}\n".encode())
    return f"v{fingerprint.LISTING_VERSION}:{h.hexdigest()}"


def _object_item(path: Loc, sizes: dict[Loc, int]) -> tuple[dict, dict]:
    """A folder item in a bucket: its size from the listing; a caption object read only if listed."""
    txt = path.parent / (path.stem + ".txt")
    item: dict = {"url": None, "caption": None, "source": str(path)}
    if txt in sizes:
        item["caption"], codec = decode_caption(txt.read_bytes())
        if codec:
            item[_CODEC] = codec
    return item, {"reason": "", "src": str(path), "offset": 0, "size": sizes[path], "row": -1}


# ---------------------------------------------------------------------------------------------
# Table: parquet, or the .arrow files of `datasets.Dataset.save_to_disk`
# ---------------------------------------------------------------------------------------------


def _read_arrow(path: Loc) -> pa.Table:
    """An .arrow file (datasets writes the IPC stream format; the file format is read too), memory-mapped
    on disk; in a bucket read whole (prefer parquet there: it is read by row groups)."""
    if not path.is_local:
        data = pa.py_buffer(path.read_bytes())
        try:
            return pa.ipc.open_stream(data).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(data).read_all()
    source = pa.memory_map(path.path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path.path)).read_all()


def _parquet(path: Loc) -> pq.ParquetFile:
    """A parquet table on disk or in a bucket (there: ranged GETs for the footer and the row groups read)."""
    return pq.ParquetFile(path.path if path.is_local else path.open("rb"))


def _table_schema(path: Loc) -> pa.Schema:
    return _parquet(path).schema_arrow if path.suffix == ".parquet" else _read_arrow(path).schema


def _table_rows(path: Loc) -> int:
    return _parquet(path).metadata.num_rows if path.suffix == ".parquet" else _read_arrow(path).num_rows


def image_column(schema: pa.Schema, given: str | None, where: str) -> str | None:
    """The column holding image bytes: named, else the first of the usual names with bytes, else the
    first column with bytes (binary, or a struct with a binary `bytes` field: datasets' Image)."""

    def has_bytes(t: pa.DataType) -> bool:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    if given:
        if given not in schema.names or not has_bytes(schema.field(given).type):
            raise SigmaError(
                f"{where}: no image-bytes column {given!r} (--image-col / curation.image_col; "
                f"columns: {', '.join(f'{f.name}: {f.type}' for f in schema)})"
            )
        return given
    candidates = [f.name for f in schema if has_bytes(f.type)]
    return next((n for n in IMAGE_NAMES if n in candidates), candidates[0] if candidates else None)


def _table_items(path: Loc, src: LocalImages, shard_size: int) -> Iterator[tuple[dict, dict]]:
    columns = [c for c in _table_schema(path).names if c != src.image_col]
    if path.suffix == ".parquet":
        batches = _parquet(path).iter_batches(batch_size=shard_size, columns=columns)
    else:
        batches = _read_arrow(path).select(columns).to_batches(max_chunksize=shard_size)
    row = 0
    for batch in batches:
        for r in batch.to_pylist():
            url = r.pop(src.url_col) if src.url_col else None
            caption = r.pop(src.caption_col) if src.caption_col else None
            item = {
                "url": url if isinstance(url, str) else None,
                "caption": None if caption is None else str(caption),
                "source": f"{path}#{row}",
                **{inputs.input_name(k, None, None): v for k, v in r.items()},
            }
            yield item, {"reason": "", "src": str(path), "offset": 0, "size": 0, "row": row}
            row += 1


def _image_bytes(path: Loc, image_col: str, rows: list[int]) -> Iterator[tuple[int, bytes | str | None]]:
    """(row, image bytes) for some rows of a table file, one parquet row group in memory at a time
    (only the groups holding them are read); an .arrow file is memory-mapped."""
    if path.suffix == ".parquet":
        import bisect

        f = _parquet(path)
        starts = [0]
        for g in range(f.metadata.num_row_groups):
            starts.append(starts[-1] + f.metadata.row_group(g).num_rows)
        groups: dict[int, list[int]] = {}
        for r in rows:
            groups.setdefault(bisect.bisect_right(starts, r) - 1, []).append(r)
        for g, members in sorted(groups.items()):
            column = f.read_row_group(g, columns=[image_col]).column(0)
            for r in members:
                yield r, _cell_bytes(column[r - starts[g]].as_py(), path)
    else:
        column = _read_arrow(path).column(image_col)
        for r in rows:
            yield r, _cell_bytes(column[r].as_py(), path)


def _cell_bytes(value, table: Loc) -> bytes | str | None:
    """A cell's image bytes: binary as is; datasets' Image struct: its bytes, or the file at its path
    (absolute, e.g. into a Hugging Face cache, or relative to the table's folder, on disk or in the
    bucket); a reason code when that file cannot be read (special_file, unreadable, unresolved_link);
    None when there is none."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path") and not table.is_local and not os.path.isabs(value["path"]):
            obj = table.parent / value["path"]
            return obj.read_bytes() if obj.is_file() else None
        if data is None and value.get("path"):
            p = Path(value["path"]) if Path(value["path"]).is_absolute() else table.local.parent / value["path"]
            if not os.path.lexists(p):
                return None
            problem = local_problem(p)
            if problem:
                return problem
            try:
                data = p.read_bytes()
            except OSError:
                return reasons.UNREADABLE
        return data
    return value


def _copy_table_bytes(rows: list[dict], image_col: str, tar_path: Loc, tables: tuple[Loc, ...]) -> list[dict]:
    """Copy the rows' image bytes into the run's own tar (KEY.img members; written as read, never a
    whole shard in memory) and point the rows at them."""
    import io

    by_url = {str(t): t for t in tables}
    by_file: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_file.setdefault(r["src"], {})[r["row"]] = r
    why: dict[str, str] = {}  # key -> the reason its cell's file could not be read
    offsets = {}
    with atomic.atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for file, by_row in by_file.items():
                table = by_url.get(file) or storage.resolve(file)
                for row, data in _image_bytes(table, image_col, sorted(by_row)):
                    if isinstance(data, str):
                        why[by_row[row]["key"]] = data
                    elif data:
                        info = tarfile.TarInfo(f"{by_row[row]['key']}.img")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
        with tarfile.open(tmp, "r:") as tar:  # headers only: where each copy's bytes start
            for m in tar:
                offsets[m.name.partition(".")[0]] = (m.offset_data, m.size)
    for r in rows:
        if r["key"] in offsets:
            r.update(src=str(tar_path), offset=offsets[r["key"]][0], size=offsets[r["key"]][1])
        else:  # no bytes in the table's cell (null, a path that is not there, or a file not readable)
            r.update(reason=why.get(r["key"], reasons.NOT_AN_IMAGE), src="", offset=0, size=0)
    return rows


# ---------------------------------------------------------------------------------------------
# What the summary says about an on-disk input
# ---------------------------------------------------------------------------------------------

# img2dataset's defaults (1.47): --resize_mode border --image_size 256, and every image re-encoded as JPEG
I2D_KEEP_ORIGINALS = "--resize_mode no --disable_all_reencoding True"


def notes(stats: dict, manifest: Loc) -> list[str]:
    """One-line notes for the summary of an on-disk run: captions that were not UTF-8, and most images
    sharing one small size (img2dataset's default resize: a too_small run says why)."""
    out = []
    decoded = stats.get("captions_not_utf8") or {}
    if decoded:
        how = ", ".join(f"{codec} ({n})" for codec, n in decoded.items())
        out.append(f"{sum(decoded.values())} caption files not in UTF-8: decoded as {how} (curation/README.md)")
    with manifest.open("rb") as f:
        sizes = pq.read_table(f, columns=["width", "height", "reason"]).to_pandas()
    sizes = sizes[sizes["width"].fillna(0) > 0]
    if len(sizes) >= 4:
        (w, h), n = Counter(zip(sizes["width"], sizes["height"])).most_common(1)[0]
        small = sizes[(sizes["width"] == w) & (sizes["height"] == h)]
        if n * 2 >= len(sizes) and (small["reason"] == reasons.TOO_SMALL).all():
            out.append(
                f"{n} of {len(sizes)} images are {int(w)}x{int(h)} (too_small): the mark of a resize, such as "
                f"img2dataset's default (--resize_mode border, --image_size 256, re-encoded as JPEG); to keep "
                f"the originals run it with {I2D_KEEP_ORIGINALS} (README: Bring your own data)"
            )
    return out


# ---------------------------------------------------------------------------------------------
# What a spec names
# ---------------------------------------------------------------------------------------------


def local_images(
    spec: str | Path,
    out: str | Path | Loc | None = None,
    caption_col: str | None = None,
    image_col: str | None = None,
    url_col: str | None = None,
    options: Any = None,
) -> LocalImages:
    """Resolve `--images SPEC` (a path or bucket URL; `options`: the `storage` config section) into its
    kind and files (names and headers only); SigmaError naming the path."""
    try:
        return _local_images(str(spec), out, caption_col, image_col, url_col, options)
    except OSError as e:  # the folder or table itself may not be read: nothing to account for, one line
        message = storage.failure(spec, e) if "://" in str(spec) else None  # a bucket: missing, denied, ...
        why = os.strerror(e.errno) if e.errno else str(e).splitlines()[0]
        raise SigmaError(message or f"{e.filename or spec}: cannot read ({why})") from None


def _local_images(spec: str, out, caption_col, image_col, url_col, options) -> LocalImages:
    p = storage.resolve(spec, options)
    if p.is_dir():
        entries = inputs.folder_files(p)
        tars = [f for f in entries if f.suffix == ".tar"]
        tables = [f for f in entries if f.suffix in (".parquet", ".arrow")]
        if tars:
            found = LocalImages(spec, "shards", tuple(tars))
        elif tables and _table_image_column(tables[0], image_col) is not None:
            found = _table(spec, tables, caption_col, image_col, url_col)
        else:
            found = LocalImages(spec, "folder", (p,))
    elif p.is_file() and p.suffix in (".parquet", ".arrow"):
        found = _table(spec, [p], caption_col, image_col, url_col)
    else:
        files = _existing(storage.expand(spec, options)) if not p.is_file() or p.suffix == ".tar" else []
        if not files:
            raise inputs.NotFound(
                f"{spec}: no images found (give a .tar, a brace/glob pattern of tars, a folder of "
                "images or tars, or a .parquet/.arrow table with an image column)"
            )
        if all(f.suffix in (".parquet", ".arrow") for f in files):
            found = _table(spec, files, caption_col, image_col, url_col)
        elif all(f.suffix == ".tar" for f in files):
            found = LocalImages(spec, "shards", tuple(files))
        else:
            raise SigmaError(f"{spec}: mixes tars and other files; give tars or tables")
    if out is not None:  # the run writes and deletes its own files under --out: never among the user's
        o = _real(out if isinstance(out, Loc) else storage.resolve(out, options))
        for f in map(_real, found.files):
            if f.is_under(o) or (found.kind == "folder" and o.is_under(f) and o != f):
                raise SigmaError(f"{spec}: overlaps --out {out}; keep the run's output apart from its input")
    return found


def _real(loc: Loc) -> Loc:
    """On disk with links resolved (the same folder under two names is one); a bucket Loc as it is."""
    return Loc("", os.path.realpath(loc.path)) if loc.is_local else Loc(loc.scheme, loc.path.rstrip("/"))


def _existing(locs: list[Loc]) -> list[Loc]:
    """The Locs that are files, in order: on disk each checked; in a bucket one listing per folder
    (a hundred brace-named tars are one LIST, not a hundred HEADs)."""
    out, listed = [], {}
    for loc in locs:
        if loc.is_local:
            if loc.is_file():
                out.append(loc)
            continue
        parent = loc.parent
        if parent not in listed:
            listed[parent] = set(inputs.folder_files(parent)) if parent != loc else set()
        if loc in listed[parent]:
            out.append(loc)
    return out


def _table_image_column(path: Loc, given: str | None) -> str | None:
    return image_column(_table_schema(path), given, str(path))


def _table(spec: str, files: list[Loc], caption_col, image_col, url_col) -> LocalImages:
    schema = _table_schema(files[0])
    image = image_column(schema, image_col, str(files[0]))
    if image is None:
        raise SigmaError(
            f"{files[0]}: no image-bytes column (binary, or a {{bytes, path}} struct; columns: "
            f"{', '.join(f'{f.name}: {f.type}' for f in schema)}); name it with --image-col"
        )
    names = [n for n in schema.names if n != image]
    caption = inputs.choose(
        names, caption_col, inputs.CAPTION_NAMES, "--caption-col / curation.caption_col", str(files[0])
    )
    url = inputs.choose(names, url_col, inputs.URL_NAMES, "--url-col / curation.url_col", str(files[0]))
    for f in files[1:]:
        if _table_schema(f).names != schema.names:
            raise SigmaError(f"{f}: columns differ from the first table's ({', '.join(schema.names)})")
    return LocalImages(spec, "table", tuple(files), image, caption, url)
