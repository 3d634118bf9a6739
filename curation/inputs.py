"""URL lists as img2dataset reads them -> keyed input shards (`_work/input/NNNNN.parquet`).

A list is a `.parquet`, `.csv`, `.tsv`, `.jsonl` (`.json` lines) or `.txt` file (one URL per line;
csv/tsv/jsonl/txt may be `.gz`), or a folder or glob/brace pattern of such files, read in sorted
order as one list, on disk or in a bucket (`s3://...`, read through shards/storage.py). The URL
and caption columns are named (`--url-col`, `--caption-col`, the
`curation.url_col` / `curation.caption_col` keys) or found among the usual names, so a LAION or
DataComp parquet (`URL`, `TEXT`, ...) runs as it is. Every other column is carried per sample into
the manifest and each sample's `.json` (img2dataset's `save_additional_columns`).

In the input shards the chosen columns are renamed `url` and `caption` (what the rest of the stage
reads); a column that would clash keeps its value as `input_<name>`. Each row is keyed by its
position in the whole list (10 digits), so the keys are the same however the list is cut.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation import download
from shards import atomic, fingerprint, storage
from shards.errors import SigmaError
from shards.storage import Loc

KEY_DIGITS = 10  # row index in the whole input, zero-padded: sortable, no dots
URL, CAPTION = "url", "caption"  # the names the input shards give the chosen columns
FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
URL_NAMES = ("url", "URL", "image_url", "img_url", "link")  # img2dataset's default, LAION/DataComp, others seen
CAPTION_NAMES = ("caption", "TEXT", "text", "alt", "alt_text", "Caption")


class NotFound(SigmaError):
    """The input is not there (yet): a run stops, a --dry-run plans without it."""


def list_format(path: str | Path | Loc) -> str | None:
    """'parquet', 'csv', ... for a list file (a `.gz` of a text format too); None for anything else."""
    parts = (path.name if isinstance(path, Loc) else Path(path).name).lower().split(".")
    if len(parts) > 2 and parts[-1] == "gz" and parts[-2] in ("csv", "tsv", "jsonl", "json", "txt"):
        return parts[-2]
    return parts[-1] if len(parts) > 1 and parts[-1] in FORMATS else None


def expand(spec: str | Path | Loc, what: str = "URL list", options: Any = None) -> list[Loc]:
    """The files a spec names: one file, a folder (its list files, sorted), or a glob/brace pattern,
    on disk or in a bucket (`options`: the `storage` config section)."""
    p = spec if isinstance(spec, Loc) else storage.resolve(spec, options)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = [f for f in folder_files(p) if list_format(f)]
        if not files:
            raise SigmaError(f"{spec}: no {what} files in this folder (.{', .'.join(FORMATS)})")
        return files
    if isinstance(spec, Loc) or not storage.has_pattern(str(spec)):
        raise NotFound(f"{spec}: {what} not found")
    files = [f for f in storage.expand(str(spec), options) if f.is_file()]
    if not files:
        raise NotFound(f"{spec}: {what} not found")
    return files


def folder_files(folder: Loc) -> list[Loc]:
    """The files directly in a folder, sorted (a bucket: one listing, no request per file)."""
    if folder.is_local:
        return [f for f in folder.iterdir() if f.is_file()]
    try:
        entries = folder.fs.ls(folder.path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(Loc(folder.scheme, e["name"].rstrip("/"), folder.options) for e in entries if e["type"] == "file")


def choose(names: list[str], given: str | None, usual: tuple[str, ...], flag: str, where: str) -> str | None:
    """The column to read: the one named (it must exist), else the first usual name present
    (exact, then ignoring case), else None."""
    if given:
        if given not in names:
            raise SigmaError(f"{where}: no column {given!r} ({flag}; columns: {', '.join(names)})")
        return given
    for name in usual:
        if name in names:
            return name
    lower = {n.lower(): n for n in names}
    return next((lower[u.lower()] for u in usual if u.lower() in lower), None)


def input_name(col: str, url_col: str | None, caption_col: str | None) -> str:
    """A column's name in the input shards: `url` / `caption` for the chosen ones; another column keeps
    its name unless it clashes with those or with a manifest column (then `input_<name>`)."""
    from shards.format import MANIFEST_COLUMNS

    if col == url_col:
        return URL
    if col == caption_col:
        return CAPTION
    return f"input_{col}" if col in (*MANIFEST_COLUMNS, URL, CAPTION, "source") else col


# ---------------------------------------------------------------------------------------------
# Reading one list file
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _open_text(path: Loc) -> Iterator[io.TextIOBase]:
    """A text list (a `.gz` decompressed), streamed from disk or a bucket, as spreadsheets save them: a
    UTF-8 byte-order mark (Excel's "CSV UTF-8") is read as nothing, and newline="" leaves CRLF and
    newlines inside quoted csv values to the csv reader."""
    with path.open("rb") as raw:
        binary = gzip.GzipFile(fileobj=raw) if path.name.lower().endswith(".gz") else raw
        with io.TextIOWrapper(binary, encoding="utf-8-sig", newline="") as f:
            yield f


@contextlib.contextmanager
def _arrow_source(path: Loc) -> Iterator[Any]:
    """What pyarrow reads a list file from: the local path (pyarrow reads the disk itself, a `.gz`
    decompressed by its name) or a bucket object's seekable stream (a `.gz` decompressed here)."""
    if path.is_local:
        yield path.path
        return
    with path.open("rb") as raw:
        gz = path.name.lower().endswith(".gz")
        yield pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "gzip") if gz else raw


def column_names(path: Loc) -> list[str]:
    """A list file's columns, from its header (parquet: the footer), never its rows."""
    fmt = list_format(path)
    if fmt == "parquet":
        with _arrow_source(path) as f:
            return pq.read_schema(f).names
    if fmt == "txt":
        return [URL]
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            import csv

            return next(csv.reader(f, delimiter="," if fmt == "csv" else "\t"), [])
        for line in f:
            if line.strip():
                return list(json.loads(line))
    return []


def count_rows(path: Loc) -> int:
    """Rows of a list file: parquet from its footer; csv/tsv as records (a quoted value may hold newlines),
    jsonl/txt by counting non-blank lines."""
    fmt = list_format(path)
    if fmt == "parquet":
        with _arrow_source(path) as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    with _open_text(path) as f:
        if fmt in ("csv", "tsv"):
            import csv

            n = sum(1 for record in csv.reader(f, delimiter="," if fmt == "csv" else "\t") if any(record))
            return max(n - 1, 0)  # the header
        return sum(1 for line in f if line.strip())


def _batches(path: Loc, rows: int, url_col: str) -> Iterator[pa.RecordBatch]:
    """Stream one list file as record batches (never the whole list in memory)."""
    fmt = list_format(path)
    if fmt == "parquet":
        with _arrow_source(path) as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=rows)
    elif fmt in ("csv", "tsv"):
        from pyarrow import csv

        with _arrow_source(path) as f:
            yield from csv.open_csv(
                f,
                read_options=csv.ReadOptions(block_size=1 << 22),
                # a quoted value may hold newlines (a caption typed with Alt+Enter in Excel); a BOM is skipped
                parse_options=csv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True),
                convert_options=csv.ConvertOptions(column_types={url_col: pa.string()}),
            )
    elif fmt == "txt":
        with _open_text(path) as f:
            chunk: list[str] = []
            for line in f:
                if line.strip():
                    chunk.append(line.strip())
                if len(chunk) == rows:
                    yield pa.record_batch([pa.array(chunk, pa.string())], names=[URL])
                    chunk = []
            if chunk:
                yield pa.record_batch([pa.array(chunk, pa.string())], names=[URL])
    else:  # jsonl
        import pandas as pd

        with _open_text(path) as f:
            for frame in pd.read_json(f, lines=True, chunksize=rows, dtype=False):
                yield pa.RecordBatch.from_pandas(frame, preserve_index=False)


# ---------------------------------------------------------------------------------------------
# The list as a whole
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UrlList:
    """A URL list resolved once (files, chosen columns), before anything runs; also the pipeline's
    input source: `split`, `shard_rows`, `fingerprint`, `describe` (sources.LocalImages has the same)."""

    spec: str
    files: tuple[Loc, ...]
    url_col: str
    caption_col: str | None
    columns: tuple[str, ...]  # of the first file; every file must have the same
    words = ("download shard", "URLs")  # what the progress lines call a shard and its items

    def describe(self) -> dict:
        """What --dry-run prints: files, rows (footer or line count), the chosen and carried columns."""
        carried = [c for c in self.columns if c not in (self.url_col, self.caption_col)]
        return {
            "urls": self.spec,
            "files": len(self.files),
            "format": sorted({list_format(f) for f in self.files}),
            "rows": sum(count_rows(f) for f in self.files),
            "url_col": self.url_col,
            "caption_col": self.caption_col,
            "carried": [input_name(c, None, None) for c in carried],
        }

    def fingerprint(self) -> dict:
        """The list's bytes (one file: its digest, as runs before folders of lists recorded it)."""
        if len(self.files) == 1:
            return {"--urls": fingerprint.file_digest(self.files[0])}
        return {"--urls": [f"{f.name} {fingerprint.file_digest(f)}" for f in self.files]}

    def split(self, work: Path | Loc, shard_size: int) -> int:
        """Write `work/NNNNN.parquet` input shards (key + input columns); returns the shard count.
        Done once: a `.complete` file records the count, so a rerun reads the same shards."""
        work = as_loc(work)
        done = work / ".complete"
        if done.has_file():
            return int(done.read_text())
        work.mkdir()
        n_rows, n_shards, pending, schema = 0, 0, [], None
        for f in self.files:
            try:
                for batch in _batches(f, shard_size, self.url_col):
                    schema = schema or batch.schema
                    pending.append(_conform(batch, schema, f))
                    while sum(len(b) for b in pending) >= shard_size:
                        n_rows, n_shards, pending = self._flush(work, pending, shard_size, n_rows, n_shards)
            except SigmaError:
                raise
            except Exception as e:  # noqa: BLE001 - any reader error is a bad input file
                first = str(e).splitlines()[0] if str(e) else ""
                raise SigmaError(f"{f}: cannot read ({type(e).__name__}: {first})") from None
        if pending and sum(len(b) for b in pending):
            n_rows, n_shards, _ = self._flush(work, pending, shard_size, n_rows, n_shards)
        if n_rows == 0:
            raise SigmaError(f"{self.spec}: the URL list is empty")
        atomic.write_text(done, str(n_shards))
        return n_shards

    def _flush(self, work: Loc, pending: list, size: int, n_rows: int, n_shards: int):
        table = pa.Table.from_batches(pending).combine_chunks()
        head, rest = table.slice(0, size), table.slice(size)
        keys = pa.array([f"{n_rows + i:0{KEY_DIGITS}d}" for i in range(len(head))])
        head = head.rename_columns([input_name(c, self.url_col, self.caption_col) for c in head.column_names])
        text = (URL, CAPTION)  # a caption of numbers stays text
        head = head.cast(pa.schema([f.with_type(pa.string()) if f.name in text else f for f in head.schema]))
        atomic.write_parquet(work / f"{n_shards:05d}.parquet", head.add_column(0, "key", keys))
        return n_rows + len(head), n_shards + 1, rest.to_batches()

    def shard_rows(self, work: storage.Loc, downloads: storage.Loc, shard: int, cur) -> Iterator[dict]:
        """Download one input shard (img2dataset, unless done) and say where each row's bytes lie."""
        src = work / "input" / f"{shard:05d}.parquet"
        download.download_shard(src, downloads, shard, download.crawl_of(cur.download))
        return download.iter_shard(src, downloads, shard)


def as_loc(path: str | Path | Loc) -> Loc:
    """A run's own folder (under --out) as a Loc: the entry point hands down a Loc or a local path."""
    return path if isinstance(path, Loc) else storage.resolve(path)


def _conform(batch: pa.RecordBatch, schema: pa.Schema, path: Loc) -> pa.RecordBatch:
    """Every file of a list must have the first one's columns; types are cast to the first's."""
    if batch.schema.names != schema.names:
        raise SigmaError(
            f"{path}: columns {', '.join(batch.schema.names)} differ from the list's first file "
            f"({', '.join(schema.names)})"
        )
    if batch.schema == schema:
        return batch
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SigmaError(f"{path}: column types differ from the list's first file ({e})") from None


def url_list(
    spec: str | Path | Loc, url_col: str | None = None, caption_col: str | None = None, options: Any = None
) -> UrlList:
    """Resolve a URL list (a path or bucket URL; `options`: the `storage` config section): its files and
    columns, checked from the headers (SigmaError naming the file)."""
    files = expand(spec, options=options)
    for f in files:
        if not list_format(f):
            raise SigmaError(f"{f}: unsupported format; use .{', .'.join(FORMATS)} (or a folder or glob of them)")
    try:
        names = column_names(files[0])
    except Exception as e:  # noqa: BLE001 - any reader error is a bad input file
        raise SigmaError(
            f"{files[0]}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    url = choose(names, url_col, URL_NAMES, "--url-col / curation.url_col", str(files[0]))
    if url is None:
        raise SigmaError(
            f"{files[0]}: no URL column (looked for {', '.join(URL_NAMES)}; columns: "
            f"{', '.join(names)}); name it with --url-col"
        )
    caption = choose(names, caption_col, CAPTION_NAMES, "--caption-col / curation.caption_col", str(files[0]))
    if all(list_format(f) == "parquet" for f in files) and not sum(count_rows(f) for f in files):
        raise SigmaError(f"{spec}: the URL list is empty")  # from the footers; text lists are counted by the split
    return UrlList(str(spec), tuple(files), url, caption, tuple(names))


def split_input(
    path: str | Path, work: Path | Loc, shard_size: int, url_col: str | None = None, caption_col: str | None = None
) -> int:
    """`url_list(path, ...).split(work, shard_size)`: the keyed input shards of a URL list."""
    return url_list(path, url_col, caption_col).split(work, shard_size)
