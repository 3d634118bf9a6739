"""Images already on disk as a curation input (`--images SPEC`): WebDataset / img2dataset shards, a
folder tree of images, or a parquet / Hugging Face `datasets` table with an image-bytes column.

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

    shards   one input shard per tar; sample = members sharing a key (WebDataset); image = its
             .jpg/.png/.webp/... member; caption = .txt (else the .json's `caption`); the .json's
             other fields are carried (img2dataset's bookkeeping dropped, its `url` kept as url)
             source = TAR::MEMBER
    folder   every image file under the folder (sorted paths), `download.shard_size` per input shard;
             caption = a same-stem .txt beside it; source = the file's path
    table    `download.shard_size` rows per input shard; caption/url columns found as in a URL list,
             other columns carried; source = TABLE#ROW
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation import inputs
from shards import atomic, curated, fingerprint, reasons, storage
from shards.errors import SigmaError

WHERE = "where"  # _work/where/NNNNN.parquet
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
    """Images on disk, resolved once: the kind and files (tars; tables; or the folder itself) and,
    for a table, the image and caption columns. The same methods as inputs.UrlList."""

    spec: str
    kind: str  # "shards" | "folder" | "table"
    files: tuple[str, ...]
    image_col: str | None = None
    caption_col: str | None = None
    url_col: str | None = None

    def describe(self) -> dict:
        """What --dry-run prints (from names and headers only: no image is read)."""
        plan = {"images": self.spec, "kind": self.kind, "files": len(self.files)}
        if self.kind == "table":
            plan.update(
                rows=sum(_table_rows(Path(f)) for f in self.files),
                image_col=self.image_col,
                caption_col=self.caption_col,
                url_col=self.url_col,
            )
        return plan

    def fingerprint(self) -> dict:
        """Names and sizes of the input files (images are too many to hash; a changed file changes its size)."""
        files = self._item_files() if self.kind == "folder" else list(map(Path, self.files))
        return {"--images": f"{self.kind} {fingerprint.listing(files)}"}

    def _item_files(self) -> list[Path]:
        root = Path(self.files[0])
        out = []
        for folder, dirs, names in os.walk(root):
            dirs.sort()
            out += [Path(folder) / n for n in sorted(names) if _ext(n) in IMAGE_EXTS]
        return sorted(out, key=lambda p: str(p.relative_to(root)))

    def split(self, work: Path | storage.Loc, shard_size: int) -> int:
        """Keyed input shards + where each item's bytes lie; done once (`.complete`), like a URL list."""
        work = work if isinstance(work, storage.Loc) else storage.resolve(work)
        done = work / ".complete"
        if done.has_file():
            return int(done.read_text())
        work.mkdir()
        out = _Shards(work, self._schema())
        if self.kind == "shards":
            for tar in self.files:
                for item, where in _tar_items(Path(tar)):
                    out.add(item, where)
                out.flush()  # one input shard per user tar: the tar is the unit of work
        elif self.kind == "folder":
            for path in self._item_files():
                out.add(*_file_item(path))
                if out.full(shard_size):
                    out.flush()
        else:
            for table in self.files:
                for item, where in _table_items(Path(table), self, shard_size):
                    out.add(item, where)
                    if out.full(shard_size):
                        out.flush()
        out.flush()
        if out.rows == 0:
            raise SigmaError(f"{self.spec}: no images found")
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
        table = _table_schema(Path(self.files[0]))
        return pa.schema(base + [(inputs.input_name(f.name, None, None), f.type) for f in table if f.name not in skip])

    def shard_rows(self, work: storage.Loc, downloads: storage.Loc, shard: int, cur) -> Iterator[dict]:
        """Rows saying where each item's bytes lie (what a download shard yields); a table's bytes
        are copied first into `downloads/NNNNN.tar` (the run's own file)."""
        rows = storage.read_parquet(work / WHERE / f"{shard:05d}.parquet").to_pylist()
        if self.kind == "table":
            rows = _copy_table_bytes(rows, self.image_col, downloads / f"{shard:05d}.tar")
        for r in rows:
            del r["row"]
            yield r


class _Shards:
    """Accumulates items and writes input shard + where file pairs, keys numbered across the input."""

    def __init__(self, work: storage.Loc, schema: pa.Schema | None):
        self.work, self.schema = work, schema
        self.items: list[dict] = []
        self.wheres: list[dict] = []
        self.rows = self.shards = 0

    def add(self, item: dict, where: dict) -> None:
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


def _tar_items(tar_path: Path) -> Iterator[tuple[dict, dict]]:
    try:
        tar = tarfile.open(tar_path, "r:")
    except (tarfile.TarError, OSError) as e:
        raise SigmaError(f"{tar_path}: not a readable tar ({type(e).__name__}: {e})") from None
    samples: dict[str, dict] = {}  # key -> {ext: member}, in member order
    with tar:
        try:
            for m in tar:
                if m.isfile():
                    key, ext = curated.split_name(m.name)
                    samples.setdefault(key, {})[ext.lower()] = m
        except (tarfile.TarError, OSError, EOFError) as e:
            raise SigmaError(
                f"{tar_path}: corrupt tar after {len(samples)} samples ({type(e).__name__}: {e})"
            ) from None
        for key, members in samples.items():
            meta = {}
            if "json" in members:
                try:
                    meta = json.loads(tar.extractfile(members["json"]).read())
                except ValueError:
                    meta = {}
            meta = meta if isinstance(meta, dict) else {}
            caption = (
                tar.extractfile(members["txt"]).read().decode("utf-8", "replace")
                if "txt" in members
                else meta.get("caption")
            )
            image = next((members[e] for e in members if e in IMAGE_EXTS), None)
            item = {
                "url": meta.get("url") if isinstance(meta.get("url"), str) else None,
                "caption": caption if isinstance(caption, str) else None,
                "source": f"{tar_path}::{image.name if image else key}",
                **{inputs.input_name(k, None, None): v for k, v in meta.items() if k not in I2D_FIELDS},
            }
            if image is None:  # a sample without an image member: accounted for, never usable
                yield item, {"reason": reasons.NOT_AN_IMAGE, "src": "", "offset": 0, "size": 0, "row": -1}
            else:
                yield (
                    item,
                    {"reason": "", "src": str(tar_path), "offset": image.offset_data, "size": image.size, "row": -1},
                )


# ---------------------------------------------------------------------------------------------
# Folder: one file per image, an optional same-stem .txt caption
# ---------------------------------------------------------------------------------------------


def _file_item(path: Path) -> tuple[dict, dict]:
    txt = path.with_suffix(".txt")
    caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
    return (
        {"url": None, "caption": caption, "source": str(path)},
        {"reason": "", "src": str(path), "offset": 0, "size": path.stat().st_size, "row": -1},
    )


# ---------------------------------------------------------------------------------------------
# Table: parquet, or the .arrow files of `datasets.Dataset.save_to_disk`
# ---------------------------------------------------------------------------------------------


def _read_arrow(path: Path) -> pa.Table:
    """An .arrow file (datasets writes the IPC stream format; the file format is read too), memory-mapped."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _table_schema(path: Path) -> pa.Schema:
    return pq.read_schema(path) if path.suffix == ".parquet" else _read_arrow(path).schema


def _table_rows(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows if path.suffix == ".parquet" else _read_arrow(path).num_rows


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


def _table_items(path: Path, src: LocalImages, shard_size: int) -> Iterator[tuple[dict, dict]]:
    columns = [c for c in _table_schema(path).names if c != src.image_col]
    if path.suffix == ".parquet":
        batches = pq.ParquetFile(path).iter_batches(batch_size=shard_size, columns=columns)
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


def _image_bytes(path: Path, image_col: str, rows: list[int]) -> Iterator[tuple[int, bytes | None]]:
    """(row, image bytes) for some rows of a table file, one parquet row group in memory at a time
    (only the groups holding them are read); an .arrow file is memory-mapped."""
    if path.suffix == ".parquet":
        import bisect

        f = pq.ParquetFile(path)
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


def _cell_bytes(value, table: Path) -> bytes | None:
    """A cell's image bytes: binary as is; datasets' Image struct: its bytes, or the file at its path."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None and value.get("path"):
            p = Path(value["path"]) if Path(value["path"]).is_absolute() else table.parent / value["path"]
            data = p.read_bytes() if p.is_file() else None
        return data
    return value


def _copy_table_bytes(rows: list[dict], image_col: str, tar_path: storage.Loc) -> list[dict]:
    """Copy the rows' image bytes into the run's own tar (KEY.img members; written as read, never a
    whole shard in memory) and point the rows at them."""
    import io

    by_file: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_file.setdefault(r["src"], {})[r["row"]] = r
    offsets = {}
    with atomic.atomic_path(tar_path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for file, by_row in by_file.items():
                for row, data in _image_bytes(Path(file), image_col, sorted(by_row)):
                    if data:
                        info = tarfile.TarInfo(f"{by_row[row]['key']}.img")
                        info.size, info.mtime, info.mode = len(data), 0, 0o644
                        tar.addfile(info, io.BytesIO(data))
        with tarfile.open(tmp, "r:") as tar:  # headers only, before it is moved: where each copy's bytes start
            for m in tar:
                offsets[m.name.partition(".")[0]] = (m.offset_data, m.size)
    for r in rows:
        if r["key"] in offsets:
            r.update(src=tar_path.url, offset=offsets[r["key"]][0], size=offsets[r["key"]][1])
        else:  # no bytes in the table's cell (null, or a path that is not there)
            r.update(reason=reasons.NOT_AN_IMAGE, src="", offset=0, size=0)
    return rows


# ---------------------------------------------------------------------------------------------
# What a spec names
# ---------------------------------------------------------------------------------------------


def local_images(
    spec: str | Path,
    out: str | Path | None = None,
    caption_col: str | None = None,
    image_col: str | None = None,
    url_col: str | None = None,
) -> LocalImages:
    """Resolve `--images SPEC` into its kind and files (headers only); SigmaError naming the path."""
    spec = str(spec)
    p = Path(spec)
    if p.is_dir():
        tars = sorted(f for f in p.iterdir() if f.suffix == ".tar" and f.is_file())
        tables = sorted(f for f in p.iterdir() if f.suffix in (".parquet", ".arrow") and f.is_file())
        if tars:
            found = LocalImages(spec, "shards", tuple(map(str, tars)))
        elif tables and _table_image_column(tables[0], image_col) is not None:
            found = _table(spec, tables, caption_col, image_col, url_col)
        else:
            found = LocalImages(spec, "folder", (str(p),))
    elif p.is_file() and p.suffix in (".parquet", ".arrow"):
        found = _table(spec, [p], caption_col, image_col, url_col)
    else:
        from shards.format import expand_shards

        files = [f for f in expand_shards(spec) if f.is_file()] if not p.is_file() or p.suffix == ".tar" else []
        if not files:
            raise inputs.NotFound(
                f"{spec}: no images found (give a .tar, a brace/glob pattern of tars, a folder of "
                "images or tars, or a .parquet/.arrow table with an image column)"
            )
        if all(f.suffix in (".parquet", ".arrow") for f in files):
            found = _table(spec, files, caption_col, image_col, url_col)
        elif all(f.suffix == ".tar" for f in files):
            found = LocalImages(spec, "shards", tuple(map(str, files)))
        else:
            raise SigmaError(f"{spec}: mixes tars and other files; give tars or tables")
    if out is not None:  # the run writes and deletes its own files under --out: never among the user's
        o = Path(out).resolve()
        for f in map(lambda f: Path(f).resolve(), found.files):
            if f == o or o in f.parents or (found.kind == "folder" and f in o.parents):
                raise SigmaError(f"{spec}: overlaps --out {out}; keep the run's output apart from its input")
    return found


def _table_image_column(path: Path, given: str | None) -> str | None:
    return image_column(_table_schema(path), given, str(path))


def _table(spec: str, files: list[Path], caption_col, image_col, url_col) -> LocalImages:
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
    return LocalImages(spec, "table", tuple(map(str, files)), image, caption, url)
