"""Outputs as Ray tasks: decisions joined back per download shard, output shards, one manifest.

    count (task per download shard): kept rows and rejected rows with bytes, by reason
    driver: prefix sums -> each download shard's first kept number and thumbnail quota (per shard, not per row)
    finalize (task per download shard): _work/manifest/NNNNN.parquet (its manifest rows; written last),
        _work/members/NNNNN.parquet (kept rows: where the bytes are + .json/.txt), dedup_index/NNNNN.parquet,
        thumbs/ of its share of rejected images
    tar (task per output shard, once the finalize tasks it reads are done): shards/NNNNN.tar
    driver: a download tar is deleted once its finalize and every tar reading it are done; at most
        `window` tasks in flight, and per download shard only numbers (first kept, quota, readers)
    merge (one task): manifest.parquet, one row group per download shard, streamed

Kept images are numbered in key order, so the output is the same however the work is spread.
Every file is written once, atomically (on a bucket: one object appearing whole); existing ones,
found by their exact names, are finished work, so a rerun resumes. OUT is a folder or a bucket prefix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from common import gather, progress
from common.config import CurationConfig
from curation import dedup_job, placement
from shards import atomic, curated, reasons, storage
from shards.format import MANIFEST, MANIFEST_COLUMNS, shard_name
from shards.storage import Loc

PARTS = "manifest"  # _work/manifest/NNNNN.parquet
WRITE_CPUS = 1  # a core per write task, not a quarter: fewer worker processes alive (curation/README.md)
MEMBERS = "members"  # _work/members/NNNNN.parquet
MEMBER_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("src", pa.string()),
        ("offset", pa.int64()),
        ("size", pa.int64()),
        ("ext", pa.string()),
        ("meta", pa.string()),
        ("caption", pa.string()),
        ("shard", pa.string()),
    ]
)


def decided(work: Loc, shard: int, dups: Loc | None) -> tuple[list[dict], list, list]:
    """One download shard's scored rows (key order) with each row's final reason and dup_of: the
    scored `reason` (the scoring actor's record, thresholds included), else `duplicate` if dedup says so."""
    rows = storage.read_parquet(work / "scored" / f"{shard:05d}.parquet").to_pylist()
    if not rows:
        return rows, [], []
    found = dedup_job.shard_dups(dups, rows[0]["key"], rows[-1]["key"]) if dups else {}
    dup_of = [found.get(r["key"]) for r in rows]
    reason = [reasons.DUPLICATE if d else (r["reason"] or None) for r, d in zip(rows, dup_of)]
    return rows, reason, dup_of


def _count(work: Loc, shard: int, dups: Loc | None) -> tuple[int, dict[str, int]]:
    """Ray task: (kept rows, {reason: rejected rows whose bytes exist}) of one download shard."""
    placement.mark(work, "write")
    rows, reason, _ = decided(work, shard, dups)
    thumbs: dict[str, int] = {}
    for r, why in zip(rows, reason):
        if reasons.status_of(why) == reasons.REJECTED and r["src"]:
            thumbs[why] = thumbs.get(why, 0) + 1
    return sum(why is None for why in reason), thumbs


def _finalize(
    out: Loc,
    shard: int,
    dups: Loc | None,
    first_kept: int,
    quota: dict[str, int],
    schema: pa.Schema,
    cur: CurationConfig,
    options: Any = None,
) -> int:
    """Ray task: one download shard's manifest rows, kept members, dedup index rows and thumbnails
    (`options`: the `storage` config section the rows' `src` are read with)."""
    from curation import report

    work = out / "_work"
    placement.mark(work, "write")
    part = work / PARTS / f"{shard:05d}.parquet"
    if part.has_file():
        return shard
    inputs = storage.read_parquet(work / "input" / f"{shard:05d}.parquet").to_pylist()
    rows, reason, dup_of = decided(work, shard, dups)
    carried = [c for c in schema.names if c not in MANIFEST_COLUMNS]
    manifest, members, index, rejected = [], [], [], []
    kept = first_kept
    for inp, s, why, dup in zip(inputs, rows, reason, dup_of):
        row = manifest_row(inp, s, why, dup, carried)
        if row["status"] == reasons.KEPT:
            row["shard"] = shard_name(kept // cur.shard_size)
            kept += 1
            caption = inp.get("caption")
            members.append(
                {
                    "key": s["key"],
                    "src": s["src"],
                    "offset": s["offset"],
                    "size": s["size"],
                    "ext": s["ext"],
                    "meta": curated.meta_json(row),
                    "caption": str(caption) if caption else None,
                    "shard": row["shard"],
                }
            )
            index.append(
                {
                    "key": s["key"],
                    "pixels": s["width"] * s["height"],
                    "sha256": s["sha256"],
                    "phash": s["phash"],
                    "embedding": s["embedding"],
                }
            )
        elif row["status"] == reasons.REJECTED and s["src"] and quota.get(why, 0) > 0:
            quota[why] -= 1
            rejected.append({"key": s["key"], "reason": why, "src": s["src"], "offset": s["offset"], "size": s["size"]})
        manifest.append(row)
    if rejected:  # the report's galleries show a few per reason, read while the download tar exists
        report.save_rejected_thumbnails(out, rejected, options=options)
    atomic.write_parquet(work / MEMBERS / f"{shard:05d}.parquet", pa.Table.from_pylist(members, MEMBER_SCHEMA))
    atomic.write_parquet(out / dedup_job.INDEX / f"{shard:05d}.parquet", pa.Table.from_pylist(index, INDEX_SCHEMA))
    atomic.write_parquet(part, pa.Table.from_pylist(manifest, schema=schema))  # last: marks the shard done
    return shard


INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("pixels", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("embedding", pa.binary()),
    ]
)


def manifest_row(inp: dict, s: dict, reason: str | None, dup_of: str | None, carried: list[str]) -> dict:
    """The manifest row of one input row (its scored row `s`, its final reason)."""
    return {
        "url": inp["url"],
        "key": inp["key"],
        "status": reasons.status_of(reason),
        "reason": reason,
        "width": s["width"] or None,
        "height": s["height"] or None,
        "tier": s["tier"] or None,
        "aesthetic": _num(s["aesthetic"]),
        "sharpness": _num(s["sharpness"]),
        "contrast": _num(s["contrast"]),
        "brightness": _num(s["brightness"]),
        "nsfw": _num(s["nsfw"]),
        "watermark": _num(s["watermark"]),
        "sha256": s["sha256"] or None,
        "phash": s["phash"] or None,
        "dup_of": dup_of,
        "shard": None,
        **{c: inp[c] for c in carried},
    }


def _num(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _tar(out: Loc, index: int, shards: list[int], options: Any = None) -> int:
    """Ray task: output shard `index` from the kept members of the download shards it spans."""
    work = out / "_work"
    placement.mark(work, "write")
    name = shard_name(index)
    members = []
    for i in shards:
        t = storage.read_parquet(work / MEMBERS / f"{i:05d}.parquet", filters=[("shard", "==", name)])
        members += t.to_pylist()
    curated.write_shard(out / "shards" / name, members, options)
    return index


def _merge(parts: list[Loc], path: Loc, schema: pa.Schema) -> Loc:
    """Ray task: the manifest parts, in order, as one parquet file (one row group per part), streamed
    (on a bucket a multipart upload completed at the end)."""
    with storage.writer(path) as f, pq.ParquetWriter(f, schema) as w:
        for p in parts:
            w.write_table(storage.read_parquet(p, schema=schema))
    return path


def manifest_schema(inputs: pa.Schema) -> pa.Schema:
    """The manifest's columns + the input's carried ones (a clash is already renamed by the splitter)."""
    types = {
        "width": pa.int64(),
        "height": pa.int64(),
        "aesthetic": pa.float64(),
        "sharpness": pa.float64(),
        "contrast": pa.float64(),
        "brightness": pa.float64(),
        "nsfw": pa.float64(),
        "watermark": pa.float64(),
    }
    fields = [pa.field(c, types.get(c, pa.string())) for c in MANIFEST_COLUMNS]
    return pa.schema(fields + [inputs.field(c) for c in inputs.names if c not in ("key", "url")])


def write(out: Loc, n_shards: int, dups: Loc | None, cur: CurationConfig, options: Any = None) -> dict:
    """All outputs of the run; returns {kept, shards}. Frees each download tar as soon as it can.
    `options`: the `storage` config section the scored rows' `src` are read with."""
    import ray

    work = out / "_work"
    for folder in (work / PARTS, work / MEMBERS, out / dedup_job.INDEX):
        folder.mkdir()
        atomic.clean_temp(folder)
    window = max(16, 8 * int(ray.cluster_resources().get("CPU", 1)))
    count = ray.remote(num_cpus=WRITE_CPUS, scheduling_strategy="SPREAD")(_count)
    counted = dict(gather.bounded(((i, count.remote(work, i, dups)) for i in range(n_shards)), window))
    starts = np.concatenate([[0], np.cumsum([counted[i][0] for i in range(n_shards)])]).astype(np.int64)
    kept = int(starts[-1])
    n_out = (kept + cur.shard_size - 1) // cur.shard_size
    with storage.parquet_file(work / "input" / "00000.parquet") as first:
        schema = manifest_schema(first.schema_arrow)
    from curation.report import THUMBS_PER_REASON

    quotas, left = [], {}  # per shard and reason: thumbnails to take, in shard order
    for i in range(n_shards):
        quotas.append({r: min(n, left.setdefault(r, THUMBS_PER_REASON)) for r, n in counted[i][1].items()})
        for r, n in quotas[-1].items():
            left[r] -= n
    del counted
    _schedule(out, n_shards, n_out, starts, window, dups, quotas, schema, cur, options)
    ray.get(
        ray.remote(num_cpus=WRITE_CPUS)(_merge).remote(
            [work / PARTS / f"{i:05d}.parquet" for i in range(n_shards)], out / MANIFEST, schema
        )
    )
    return {"kept": kept, "shards": n_out}


def _span_bounds(starts: np.ndarray, n_out: int, shard_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output shard k: [first, stop) of the download shards whose kept numbers
    [starts[i], starts[i+1]) meet k's [k * shard_size, (k + 1) * shard_size)."""
    lo = np.arange(n_out, dtype=np.int64) * shard_size
    hi = np.minimum(starts[-1], lo + shard_size)
    return np.searchsorted(starts, lo, side="right") - 1, np.searchsorted(starts, hi, side="left")


def _schedule(
    out: Loc,
    n_shards: int,
    n_out: int,
    starts: np.ndarray,
    window: int,
    dups: Loc | None,
    quotas: list,
    schema: pa.Schema,
    cur: CurationConfig,
    options: Any = None,
) -> None:
    """Finalize tasks in shard order, each output shard's tar task once the shards it reads are
    finalized; a download tar is deleted once it is finalized and every tar reading it is written.
    At most `window` tasks in flight; the driver keeps numbers (per download shard: finalized, readers;
    per output shard: the download shards it spans), not a task handle per shard."""
    import ray

    finalize = ray.remote(num_cpus=WRITE_CPUS, scheduling_strategy="SPREAD")(_finalize)
    tar = ray.remote(num_cpus=WRITE_CPUS, scheduling_strategy="SPREAD")(_tar)
    first, stop = _span_bounds(starts, n_out, cur.shard_size)
    edges = np.zeros(n_shards + 1, np.int64)
    np.add.at(edges, first, 1)
    np.add.at(edges, stop, -1)
    readers = np.cumsum(edges)[:n_shards]  # tar tasks still to run that read each download shard
    finalized = np.zeros(n_shards, bool)
    next_fin = next_tar = 0
    pending: dict = {}

    def free(i: int) -> None:
        if finalized[i] and readers[i] == 0:
            (out / "downloads" / f"{i:05d}.tar").unlink()
            bar.update(1)

    with progress.bar(n_shards, "shard", "write") as bar:
        while next_fin < n_shards or next_tar < n_out or pending:
            while len(pending) < window:
                if next_tar < n_out and finalized[first[next_tar] : stop[next_tar]].all():
                    spans = range(first[next_tar], stop[next_tar])
                    if (out / "shards" / shard_name(next_tar)).has_file():  # written by an earlier run
                        readers[spans.start : spans.stop] -= 1
                        for i in spans:
                            free(i)
                    else:
                        pending[tar.remote(out, next_tar, list(spans), options)] = ("tar", next_tar)
                    next_tar += 1
                elif next_fin < n_shards:
                    ref = finalize.remote(
                        out, next_fin, dups, int(starts[next_fin]), quotas[next_fin], schema, cur, options
                    )
                    pending[ref] = ("fin", next_fin)
                    next_fin += 1
                else:
                    break
            if not pending:
                continue
            done, _ = ray.wait(list(pending), num_returns=1)
            kind, n = pending.pop(done[0])
            ray.get(done[0])
            if kind == "fin":
                finalized[n] = True
                free(n)
            else:
                spans = range(first[n], stop[n])
                readers[spans.start : spans.stop] -= 1
                for i in spans:
                    free(i)
