"""URL lists as img2dataset reads them -> keyed input shards (`_work/input/NNNNN.parquet`).

A list is a `.parquet`, `.csv`, `.tsv`, `.jsonl` (`.json` lines) or `.txt` file (one URL per line;
csv/tsv/jsonl/txt may be `.gz`), or a folder or glob/brace pattern of such files, read in sorted
order as one list. The URL and caption columns are named (`--url-col`, `--caption-col`, the
`curation.url_col` / `curation.caption_col` keys) or found among the usual names, so a LAION or
DataComp parquet (`URL`, `TEXT`, ...) runs as it is. Every other column is carried per sample into
the manifest and each sample's `.json` (img2dataset's `save_additional_columns`).

In the input shards the chosen columns are renamed `url` and `caption` (what the rest of the stage
reads); a column that would clash keeps its value as `input_<name>`. Each row is keyed by its
position in the whole list (10 digits), so the keys are the same however the list is cut.
"""

from __future__ import annotations

import glob
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation import download
from shards import atomic, fingerprint, storage
from shards.errors import SigmaError

KEY_DIGITS = 10  # row index in the whole input, zero-padded: sortable, no dots
URL, CAPTION = "url", "caption"  # the names the input shards give the chosen columns
FORMATS = ("parquet", "csv", "tsv", "jsonl", "json", "txt")
URL_NAMES = ("url", "URL", "image_url", "img_url", "link")  # img2dataset's default, LAION/DataComp, others seen
CAPTION_NAMES = ("caption", "TEXT", "text", "alt", "alt_text", "Caption")


class NotFound(SigmaError):
    """The input is not there (yet): a run stops, a --dry-run plans without it."""


def list_format(path: str | Path) -> str | None:
    """'parquet', 'csv', ... for a list file (a `.gz` of a text format too); None for anything else."""
    parts = Path(path).name.lower().split(".")
    if len(parts) > 2 and parts[-1] == "gz" and parts[-2] in ("csv", "tsv", "jsonl", "json", "txt"):
        return parts[-2]
    return parts[-1] if len(parts) > 1 and parts[-1] in FORMATS else None


def expand(spec: str | Path, what: str = "URL list") -> list[Path]:
    """The files a spec names: one file, a folder (its list files, sorted), or a glob/brace pattern."""
    import braceexpand  # ships with webdataset

    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and list_format(f))
        if not files:
            raise SigmaError(f"{spec}: no {what} files in this folder (.{', .'.join(FORMATS)})")
        return files
    if p.is_file():
        return [p]
    files = [Path(m) for s in braceexpand.braceexpand(str(spec)) for m in sorted(glob.glob(s))]
    if not files:
        raise NotFound(f"{spec}: {what} not found")
    return files


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


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def column_names(path: Path) -> list[str]:
    """A list file's columns, from its header (parquet: the footer), never its rows."""
    fmt = list_format(path)
    if fmt == "parquet":
        return pq.read_schema(path).names
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


def count_rows(path: Path) -> int:
    """Rows of a list file: parquet from its footer; text formats by counting lines (no parsing)."""
    fmt = list_format(path)
    if fmt == "parquet":
        return pq.ParquetFile(path).metadata.num_rows
    with _open_text(path) as f:
        n = sum(1 for line in f if line.strip())
    return n - 1 if fmt in ("csv", "tsv") and n else n


def _batches(path: Path, rows: int, url_col: str) -> Iterator[pa.RecordBatch]:
    """Stream one list file as record batches (never the whole list in memory)."""
    fmt = list_format(path)
    if fmt == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=rows)
    elif fmt in ("csv", "tsv"):
        from pyarrow import csv

        yield from csv.open_csv(
            path,
            read_options=csv.ReadOptions(block_size=1 << 22),
            parse_options=csv.ParseOptions(delimiter="," if fmt == "csv" else "\t"),
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

        for frame in pd.read_json(path, lines=True, chunksize=rows, dtype=False, compression="infer"):
            yield pa.RecordBatch.from_pandas(frame, preserve_index=False)


# ---------------------------------------------------------------------------------------------
# The list as a whole
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UrlList:
    """A URL list resolved once (files, chosen columns), before anything runs; also the pipeline's
    input source: `split`, `shard_rows`, `fingerprint`, `describe` (sources.LocalImages has the same)."""

    spec: str
    files: tuple[str, ...]
    url_col: str
    caption_col: str | None
    columns: tuple[str, ...]  # of the first file; every file must have the same

    def describe(self) -> dict:
        """What --dry-run prints: files, rows (footer or line count), the chosen and carried columns."""
        carried = [c for c in self.columns if c not in (self.url_col, self.caption_col)]
        return {
            "urls": self.spec,
            "files": len(self.files),
            "format": sorted({list_format(f) for f in self.files}),
            "rows": sum(count_rows(Path(f)) for f in self.files),
            "url_col": self.url_col,
            "caption_col": self.caption_col,
            "carried": [input_name(c, None, None) for c in carried],
        }

    def fingerprint(self) -> dict:
        """The list's bytes (one file: its digest, as runs before folders of lists recorded it)."""
        if len(self.files) == 1:
            return {"--urls": fingerprint.file_digest(self.files[0])}
        return {"--urls": [f"{Path(f).name} {fingerprint.file_digest(f)}" for f in self.files]}

    def split(self, work: Path | storage.Loc, shard_size: int) -> int:
        """Write `work/NNNNN.parquet` input shards (key + input columns); returns the shard count.
        Done once: a `.complete` file records the count, so a rerun reads the same shards."""
        work = work if isinstance(work, storage.Loc) else storage.resolve(work)
        done = work / ".complete"
        if done.has_file():
            return int(done.read_text())
        work.mkdir()
        n_rows, n_shards, pending, schema = 0, 0, [], None
        for f in map(Path, self.files):
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

    def _flush(self, work: storage.Loc, pending: list, size: int, n_rows: int, n_shards: int):
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


def _conform(batch: pa.RecordBatch, schema: pa.Schema, path: Path) -> pa.RecordBatch:
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


def url_list(spec: str | Path, url_col: str | None = None, caption_col: str | None = None) -> UrlList:
    """Resolve a URL list: its files and columns, checked from the headers (SigmaError naming the file)."""
    files = expand(spec)
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
    return UrlList(str(spec), tuple(map(str, files)), url, caption, tuple(names))


def split_input(
    path: str | Path, work: Path, shard_size: int, url_col: str | None = None, caption_col: str | None = None
) -> int:
    """`url_list(path, ...).split(work, shard_size)`: the keyed input shards of a URL list."""
    return url_list(path, url_col, caption_col).split(work, shard_size)
