"""A caption TABLE (`--captions FILE|DIR` keyed by the curated key, in any order) turned into one caption
file per curated shard by Ray tasks: the encode driver holds per-shard and per-file facts (paths, two
keys a shard, counts), never a caption row or a key, so a table of 10^7 captions fits it.

    span  (task per curated shard)  its smallest and largest key (tar headers only) -> WORK/spans.parquet
    split (task per slice: a csv/jsonl file, or up to SLICE_ROWS rows of a parquet's row groups)
          its rows read and normalised (shards/captions.py), sorted by key and cut at the shards' spans
          -> WORK/parts/<slice>/NNNNN.parquet, then WORK/parts/<slice>.json (row count; the marker)
    merge (task per curated shard)  its rows of every slice, its own keys only -> WORK/NNNNN.parquet;
          a key given twice is refused here (every row of a key meets in the same shards' merges)

WORK is then a per-shard CAPDIR: each `read_shard` task reads its shard's file, as it reads
recaption's. The parts are deleted once every shard's file is written. WORK is
ENCDIR/_work/captions/<digest of the table's files and the shards: paths, sizes, mtimes>, so a rerun
reuses every finished file and a changed table (under --reencode) starts over. Spans may overlap
(shards of several curation runs): a row then goes to each shard whose span holds its key.
"""

from __future__ import annotations

import hashlib
import json

from common import gather
from shards import atomic, captions, curated, storage
from shards import format as fmt
from shards.errors import SigmaError

WORK = "_work/captions"
SLICE_ROWS = 1_000_000  # rows per split task of a big parquet: ~1 GB of pandas at ~300-character captions
SPANS, PARTS, TABLE = "spans.parquet", "parts", "table.json"
TASK_CPUS = 0.5  # reading and writing parquet is mostly I/O


def _loc(p: captions.Place) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def work_dir(
    encdir: captions.Place, source: captions.CaptionSource, shard_list: list, name: str = "recaption"
) -> storage.Loc:
    """ENCDIR/_work/captions/<digest> (caption set `name`: _work/captions-<name>/<digest>): one folder per
    (table files, shards) as they are now (path, size and mtime on disk; URL, size and ETag in a bucket)."""
    h = hashlib.sha256()
    for group in (source.files, shard_list):
        for p in map(_loc, group):
            h.update(("\t".join([str(p), *map(str, p.info().values())]) + "\n").encode())
        h.update(b"\n")
    return _set_work(encdir, name) / h.hexdigest()[:16]


def _set_work(encdir: captions.Place, name: str) -> storage.Loc:
    """Where caption set `name`'s table work folders live (recaption: where they lived before sets)."""
    return _loc(encdir) / (WORK if name == "recaption" else f"{WORK}-{name}")


def prepare(
    ray, source: captions.CaptionSource, shard_list: list, encdir: captions.Place, name: str = "recaption"
) -> storage.Loc:
    """Write WORK/NNNNN.parquet for every shard (reusing those that exist); returns WORK. `name`: the
    caption set (each has its own work folders). SigmaError (one line) for a key given twice, or a
    table none of whose keys is a curated key."""
    shard_list = [_loc(s) for s in shard_list]
    work = work_dir(encdir, source, shard_list, name)
    for old in _set_work(encdir, name).iterdir():  # made from another table or other shards
        if old != work:
            old.rmtree()
    window = max(16, 8 * int(ray.cluster_resources().get("CPU", 1)))
    todo = [s for s in shard_list if not fmt.caption_file(work, s).has_file()]
    if todo:
        atomic.clean_temp(work)
        if not (work / SPANS).has_file():
            task = ray.remote(num_cpus=TASK_CPUS)(span)
            got = dict(_gather(gather.bounded(((s, task.remote(s)) for s in shard_list), window)))
            atomic.write_parquet(work / SPANS, _spans_table(shard_list, got))
        task = ray.remote(num_cpus=TASK_CPUS)(split)
        facts = dict(_gather(gather.bounded(((s["id"], task.remote(s, work)) for s in slices(source)), window)))
        order = sorted(facts)  # slice ids sort in file order: the first file's first key is the example
        table = dict(
            rows=sum(facts[i]["rows"] for i in order),
            example=next((facts[i]["example"] for i in order if facts[i]["example"] is not None), None),
        )
        atomic.write_text(work / TABLE, json.dumps(table))
        task = ray.remote(num_cpus=TASK_CPUS)(merge)
        list(_gather(gather.bounded(((s, task.remote(s, work, source.path)) for s in todo), window)))
        (work / PARTS).rmtree()
    _check_some_key_matches(work, source, shard_list)
    return work


def _rows_in(path: storage.Loc) -> int:
    import pyarrow.parquet as pq

    with captions.readable(path) as src:
        return int(pq.ParquetFile(src).metadata.num_rows)


def _check_some_key_matches(work: storage.Loc, source: captions.CaptionSource, shard_list: list) -> None:
    """Refuse a table none of whose keys is a curated key (counted from the files' footers and WORK/table.json)."""
    table = json.loads((work / TABLE).read_text())
    if table["rows"] and not any(_rows_in(fmt.caption_file(work, s)) for s in shard_list):
        raise captions.no_curated_key(source.path, table["rows"], table["example"])


def _gather(results):
    """Results of Ray tasks, a task's SigmaError re-raised as itself (its one line, not Ray's traceback)."""
    import ray

    try:
        yield from results
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, SigmaError):
            raise e.cause from None
        raise


# ---------------------------------------------------------------------------------------------
# The tasks (plain functions: tests call them without Ray)
# ---------------------------------------------------------------------------------------------


def span(shard: captions.Place) -> tuple[str | None, str | None]:
    """(smallest, largest) key of a curated shard; (None, None) when it has none. A corrupt shard gives
    the span of the keys read before the fault (as before: read_shard reports them corrupt_shard)."""
    try:
        keys = curated.keys(shard)
    except curated.CorruptShard as e:
        keys = e.keys
    return (min(keys), max(keys)) if keys else (None, None)


def _spans_table(shard_list: list[storage.Loc], got: dict):
    import pyarrow as pa

    return pa.table(
        {
            "shard": [str(s) for s in shard_list],
            "first": pa.array([got[s][0] for s in shard_list], pa.string()),
            "last": pa.array([got[s][1] for s in shard_list], pa.string()),
        }
    )


def slices(source: captions.CaptionSource) -> list[dict]:
    """The split tasks: one per csv/jsonl file, one per SLICE_ROWS rows of row groups of a parquet
    (footers only). `id` sorts in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    for i, f in enumerate(source.files):
        if f.suffix != ".parquet":
            out.append(dict(id=f"{i:05d}-00000", file=f, row_groups=None))
            continue
        try:
            with captions.readable(f) as src:
                meta = pq.ParquetFile(src).metadata
        except (OSError, pa.ArrowException) as e:  # the message read_file gives
            raise SigmaError(f"{f}: unreadable caption file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        groups, start, rows = [], 0, 0
        for g in range(meta.num_row_groups):
            rows += meta.row_group(g).num_rows
            if rows >= SLICE_ROWS or g == meta.num_row_groups - 1:
                groups.append((start, g + 1))
                start, rows = g + 1, 0
        for j, g in enumerate(groups or [None]):  # a parquet without row groups: one (empty) slice
            out.append(dict(id=f"{i:05d}-{j:05d}", file=f, row_groups=g))
    return out


def split(piece: dict, work: captions.Place) -> dict:
    """One slice's rows, cut by shard span into WORK/parts/<id>/NNNNN.parquet; returns (and records in
    WORK/parts/<id>.json, written last) its row count and first key. A finished slice is not redone."""
    import numpy as np
    import pyarrow.parquet as pq

    work = _loc(work)
    parts = work / PARTS
    marker = parts / f"{piece['id']}.json"
    if marker.has_file():
        return dict(json.loads(marker.read_text()))
    df = captions.read_file(piece["file"], piece["row_groups"])
    example = str(df["key"].iloc[0]) if len(df) else None
    df = df.assign(file=_loc(piece["file"]).stem).sort_values("key", kind="stable")
    keys = df["key"].to_numpy(dtype=object)
    with captions.readable(work / SPANS) as src:
        spans = pq.read_table(src).to_pylist()
    for s in spans:
        if s["first"] is None:
            continue
        a, b = np.searchsorted(keys, s["first"], "left"), np.searchsorted(keys, s["last"], "right")
        if b > a:
            atomic.write_parquet(fmt.caption_file(parts / piece["id"], s["shard"]), df.iloc[a:b])
    facts = dict(rows=len(df), example=example)
    atomic.write_text(marker, json.dumps(facts))
    return facts


def merge(shard: captions.Place, work: captions.Place, table_path: str) -> int:
    """WORK/NNNNN.parquet: the shard's own keys' rows from every slice; returns how many. A key with two
    rows is refused, naming the files (shards.captions.check_unique)."""
    import pandas as pd

    try:
        keys = set(curated.keys(shard))
    except curated.CorruptShard as e:
        keys = set(e.keys)
    work = _loc(work)
    name = fmt.caption_file("", shard).name
    frames = []
    for p in (work / PARTS).glob(f"*/{name}"):
        with captions.readable(p) as src:
            frames.append(pd.read_parquet(src))
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*fmt.CAPTION_COLUMNS, "file"])
    df = df[df["key"].isin(keys)]
    captions.check_unique(df, table_path)
    atomic.write_parquet(fmt.caption_file(work, shard), captions.to_arrow(df.sort_values("key", kind="stable")))
    return len(df)
