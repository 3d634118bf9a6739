"""Dedup over the whole run (+ earlier runs' kept images) as plain Ray tasks over files.

    sources: this run's scored shards (their survivors, reason "") + earlier runs' dedup_index files,
             cut into G groups (G <= P, the partitions: see below)
    hashes:  a map task per group writes its (band, value) rows sorted by partition, one Arrow record
             batch per partition (_work/dedup/hashes.tmp/map/GGGGG.arrow); a reduce task per partition
             reads its batch of every map file, sorts them into groups -> edges (PPPPP.parquet)
    clip:    a map task per group writes its nodes (id, pixels, embedding); one task trains k-means on
             a sample of them; an assign task per group writes each embedding under its `probe`
             nearest clusters, one batch per partition (cluster % P); a reduce task per partition
             compares pairs inside each of its clusters -> edges
    one task: connected components over every edge, keep rule -> _work/dedup/dups.parquet (id, dup_of)

A hand-rolled shuffle: the same partitions and edges as a Ray Data groupby, without its start-up
(~14 s on 1000 URLs, ~65 s on 10^4: a small run's dedup took longer than its decoding). The G x P
reads are the shuffle's cost: an Arrow IPC file finds batch p from its small footer (~0.2 ms), where a
Parquet file of P row groups parses every group's metadata on each open (5 ms at P = 512: 512 x 512
reads took 20 min of 2 CPUs at 10^6 rows); P grows with the run, one per `dedup.partition_rows` URLs
(~120k hash rows and ~60 MB of 768-d CLIP rows at the default), at most 512, so a small run is a
handful of tasks. Each step's folder is committed whole (shards/storage.py `staging`: on disk built
beside and renamed, on a bucket a `_COMMITTED` marker written last and found by its exact name); a
rerun redoes only an unfinished step. Every file is named, never found by a listing. The work folder
is on disk or in a bucket; the driver holds only per-group counts: no rows.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import gather
from common.config import CurationConfig
from curation import dedup, placement
from shards import atomic, storage
from shards.errors import SigmaError
from shards.storage import Loc

RUN_SPAN = 10**10  # keys are 10 digits: ids of the run-th earlier run start at run * RUN_SPAN
DEDUP_DIR = "dedup"  # under _work/
DUPS = "dups.parquet"
INDEX = "dedup_index"  # OUT/dedup_index/NNNNN.parquet: kept images' key, pixels, sha256, phash, embedding
INDEX_COLUMNS = ["key", "pixels", "sha256", "phash", "embedding"]
CANDIDATE_COLUMNS = ["key", "reason", "width", "height", "sha256", "phash", "embedding"]  # of a scored shard
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("pa", pa.int64()), ("b", pa.int64()), ("pb", pa.int64())])
ROW_GROUP = 65536  # rows per row group of dups.parquet
MAX_PARTITIONS = 512


class AgainstError(SigmaError):
    """A `--dedup-against` folder that is not a finished run with a dedup index."""


def earlier_runs(folders, out) -> list[storage.Loc]:
    """The `--dedup-against` folders (paths, bucket URLs or Locs), checked: finished runs, distinct
    names (they prefix `dup_of`)."""
    runs, here = [_real(f) for f in folders], _real(out)
    for r in runs:
        if (r.scheme, r.path) == (here.scheme, here.path):
            raise AgainstError(f"--dedup-against {r}: is the output folder itself")
        if not (r / "manifest.parquet").has_file() or not (r / INDEX).is_dir():
            raise AgainstError(
                f"--dedup-against {r}: not a finished curation run with {INDEX}/ "
                "(runs made before incremental dedup have none)"
            )
    names = [r.name for r in runs]
    for n in names:
        if names.count(n) > 1:
            raise AgainstError(f"--dedup-against: two folders named {n!r} (the name prefixes dup_of; rename one)")
    return runs


def _real(folder) -> storage.Loc:
    """A folder as a Loc; on disk with its links resolved (the same folder under two names is one)."""
    loc = folder if isinstance(folder, storage.Loc) else storage.resolve(folder)
    return storage.resolve(os.path.realpath(loc.path)) if loc.is_local else loc


# ---------------------------------------------------------------------------------------------
# Nodes: this run's survivors and the earlier runs' kept images
# ---------------------------------------------------------------------------------------------


def _sources(work: Loc, n_shards: int, against: list[Loc]) -> list[tuple[Loc, int]]:
    """(file, run) of every node file: run 0 = this run's scored shards, run r = the r-th earlier run."""
    out = [(work / "scored" / f"{i:05d}.parquet", 0) for i in range(n_shards)]
    for run, folder in enumerate(against, 1):
        out += [(p, run) for p in (folder / INDEX).glob("*.parquet")]
    return out


def _read_nodes(sources: list[tuple[Loc, int]]) -> pa.Table:
    """The dedup nodes of some source files: id, pixels, sha256, phash (int64 bits), embedding."""
    tables = []
    for path, run in sources:
        if run == 0:  # survivors: the scoring actor already wrote every threshold's verdict into `reason`
            t = storage.read_parquet(path, columns=CANDIDATE_COLUMNS).filter(pc.field("reason") == "")
            pixels = pc.multiply(pc.cast(t["width"], pa.int64()), pc.cast(t["height"], pa.int64()))
        else:
            t = storage.read_parquet(path, columns=INDEX_COLUMNS)
            pixels = t["pixels"]
        tables.append(
            _nodes(
                pc.cast(t["key"], pa.int64()),
                pixels.to_numpy(zero_copy_only=False),
                t["sha256"],
                t["phash"],
                t["embedding"],
                run,
            )
        )
    return pa.concat_tables(tables) if tables else NODE_SCHEMA.empty_table()


def _nodes(keys, pixels, sha256, phash, embedding, run: int) -> pa.Table:
    ids = np.asarray(keys, np.int64) + run * RUN_SPAN
    hashes = dedup.phash_int(phash.to_pylist()).view(np.int64)
    return pa.table(
        {
            "id": ids,
            "pixels": np.asarray(pixels, np.int64),
            "sha256": pc.cast(sha256, pa.string()),
            "phash": hashes,
            "embedding": pc.cast(embedding, pa.binary()),
        },
        schema=NODE_SCHEMA,
    )


NODE_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("pixels", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.int64()),
        ("embedding", pa.binary()),
    ]
)


# ---------------------------------------------------------------------------------------------
# The shuffle: map files sorted by partition (one row group each), read back per partition
# ---------------------------------------------------------------------------------------------


HASH_SCHEMA = pa.schema(
    [
        ("band", pa.int64()),
        ("value", pa.int64()),
        ("id", pa.int64()),
        ("phash", pa.int64()),
        ("sha256", pa.string()),
        ("pixels", pa.int64()),
        ("part", pa.int64()),
    ]
)
CLIP_SCHEMA = pa.schema(
    [
        ("cluster", pa.int64()),
        ("id", pa.int64()),
        ("pixels", pa.int64()),
        ("embedding", pa.binary()),
        ("part", pa.int64()),
    ]
)


def _write_parts(path: Loc, rows: dict, schema: pa.Schema, parts: int) -> None:
    """`rows` (columns of `schema`, `part` among them) as an Arrow IPC file of `parts` record batches:
    batch p holds partition p's rows (empty when it has none)."""
    order = np.argsort(rows["part"], kind="stable")
    columns = [pa.array(rows[k][order], type=schema.field(k).type) for k in schema.names]
    bounds = np.searchsorted(rows["part"][order], np.arange(parts + 1)).tolist()
    with atomic.atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_file(f, schema) as w:
        for s, e in zip(bounds[:-1], bounds[1:]):
            w.write_batch(pa.record_batch([c.slice(s, e - s) for c in columns], schema=schema))


def _read_part(files: list[Loc], part: int) -> dict:
    """Partition `part`'s rows of every map file (its one batch of each), as numpy columns: on disk
    memory-mapped, in a bucket ranged reads of the footer and of that batch."""
    batches = []
    for f in files:
        with pa.memory_map(f.path) if f.is_local else f.open("rb") as m:
            batches.append(pa.ipc.open_file(m).get_batch(part))
    t = pa.Table.from_batches(batches).combine_chunks()
    return {c: t[c].to_numpy(zero_copy_only=False) for c in t.column_names}


def _write_edges(path: Loc, edges: dict) -> None:
    atomic.write_parquet(path, pa.table(edges, schema=EDGE_SCHEMA))


def _edge_batch(a: np.ndarray, b: np.ndarray, ids: np.ndarray, pixels: np.ndarray) -> dict:
    """Edges with both ends' pixel counts (the components step needs nothing else)."""
    order = np.argsort(ids)
    where = lambda x: pixels[order[np.searchsorted(ids[order], x)]]
    return {"a": a, "pa": where(a), "b": b, "pb": where(b)}


# ---------------------------------------------------------------------------------------------
# Exact and near duplicates (sha256, pHash bands)
# ---------------------------------------------------------------------------------------------


def _hash_rows(batch: dict, radius: int | None, parts: int) -> dict:
    """Rows to group on: (band -1, sha256 digest) for exact copies, plus one per pHash band; `part`
    spreads the (band, value) groups over the partitions."""
    n = len(batch["id"])
    exact = {
        "band": np.full(n, -1, np.int64),
        "value": np.array([_digest64(h) for h in batch["sha256"]], np.int64),
        "id": batch["id"],
        "phash": batch["phash"],
        "sha256": np.asarray(batch["sha256"], dtype=object),
        "pixels": batch["pixels"],
    }
    if radius is not None:
        near = dedup.band_rows(batch["id"], batch["phash"].view(np.uint64), radius)
        near["sha256"] = np.full(len(near["id"]), "", dtype=object)
        near["pixels"] = np.tile(batch["pixels"], radius + 1)
        exact = {k: np.concatenate([exact[k], near[k]]) for k in exact}
    exact["part"] = (_mix(exact["value"].view(np.uint64) ^ exact["band"].view(np.uint64)) % np.uint64(parts)).astype(
        np.int64
    )
    return exact


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: band values keep only some bits, so they are mixed before `% parts`."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _digest64(text: str) -> int:
    """A stable 64-bit group value for a string (Python's hash() differs between processes)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def _hash_map(sources: list, path: Loc, radius: int | None, parts: int, work: Loc) -> int:
    """Ray task: one group's (band, value) rows, sorted by partition; returns its node count."""
    placement.mark(work, "dedup")
    t = _read_nodes(sources)
    batch = {c: t[c].to_numpy(zero_copy_only=False) for c in ("id", "pixels", "sha256", "phash")}
    _write_parts(path, _hash_rows(batch, radius, parts), HASH_SCHEMA, parts)
    return len(t)


def _hash_reduce(files: list[Loc], part: int, path: Loc, radius: int, max_group: int, work: Loc) -> int:
    """Ray task: edges of one partition: its rows sorted into (band, value) groups; a group joins images
    with the same sha256 (band -1) or pHashes within `radius` (a pHash band). Most groups are
    singletons or pairs, so pairs are decided vectorised and only larger groups loop."""
    placement.mark(work, "dedup")
    batch = _read_part(files, part)
    band, value = batch["band"], batch["value"]
    order = np.lexsort((value, band))
    band, value = band[order], value[order]
    starts = (
        np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
        if len(order)
        else np.zeros(0, np.int64)
    )
    size = np.diff(np.r_[starts, len(order)])
    ids, phash, sha = batch["id"], batch["phash"].view(np.uint64), batch["sha256"]
    s2 = starts[size == 2]
    i, j = order[s2], order[s2 + 1]
    same = np.where(band[s2] == -1, sha[i] == sha[j], np.bitwise_count(phash[i] ^ phash[j]) <= radius)
    parts = [(ids[i[same]], ids[j[same]])]
    for s, n in zip(starts[size > 2].tolist(), size[size > 2].tolist()):
        rows = order[s : s + n]
        if band[s] == -1:
            parts.append(dedup.exact_edges(ids[rows], sha[rows]))
        else:
            parts.append(dedup.near_edges(ids[rows], phash[rows], radius, max_group))
    a, b = dedup.concat(parts)
    _write_edges(path, _edge_batch(a, b, ids, batch["pixels"]))
    return len(a)


# ---------------------------------------------------------------------------------------------
# Semantic duplicates (CLIP cosine inside k-means clusters)
# ---------------------------------------------------------------------------------------------


def _embeddings(column) -> np.ndarray:
    return np.stack([np.frombuffer(e, np.float16) for e in column]).astype(np.float32)


def _clip_map(sources: list, path: Loc, work: Loc) -> int:
    """Ray task: one group's nodes that have an embedding (id, pixels, embedding); returns their count."""
    placement.mark(work, "dedup")
    t = _read_nodes(sources).select(["id", "pixels", "embedding"])
    t = t.filter(pc.greater(pc.binary_length(t["embedding"]), 0))
    atomic.write_parquet(path, t)
    return len(t)


def _train(files: list[Loc], fraction: float, k: int, work: Loc) -> np.ndarray:
    """Ray task: k-means centroids from a sample (`fraction` of each node file, seeded by its place)."""
    placement.mark(work, "dedup")
    sample = []
    for g, f in enumerate(files):
        emb = storage.read_parquet(f, columns=["embedding"])["embedding"].to_numpy(zero_copy_only=False)
        pick = np.random.default_rng(g).random(len(emb)) < fraction if fraction < 1 else np.ones(len(emb), bool)
        if pick.any():
            sample.append(_embeddings(emb[pick]))
    return dedup.kmeans(np.concatenate(sample), k)


def _assign(node_file: Loc, path: Loc, centroids: np.ndarray, probe: int, parts: int, work: Loc) -> int:
    """Ray task: each node of one group under its `probe` nearest clusters, sorted by partition."""
    placement.mark(work, "dedup")
    t = storage.read_parquet(node_file)
    emb = t["embedding"].to_numpy(zero_copy_only=False)
    near = dedup.assign(_embeddings(emb), centroids, probe) if len(t) else np.zeros((0, 1), np.int64)
    p = near.shape[1]
    cluster = near.reshape(-1).astype(np.int64)
    _write_parts(
        path,
        {
            "cluster": cluster,
            "id": np.repeat(t["id"].to_numpy(), p),
            "pixels": np.repeat(t["pixels"].to_numpy(), p),
            "embedding": np.repeat(emb, p),
            "part": cluster % parts,
        },
        CLIP_SCHEMA,
        parts,
    )
    return len(t)


def _clip_reduce(files: list[Loc], part: int, path: Loc, threshold: float, work: Loc) -> int:
    """Ray task: cosine pairs inside each cluster of one partition -> edges."""
    placement.mark(work, "dedup")
    batch = _read_part(files, part)
    order = np.argsort(batch["cluster"], kind="stable")
    cuts = np.flatnonzero(np.r_[True, np.diff(batch["cluster"][order]) != 0]) if len(order) else []
    edges = []
    for rows in np.split(order, cuts[1:]) if len(order) else []:
        ids = batch["id"][rows]
        edges.append(dedup.semantic_edges(ids, dedup.normalise(_embeddings(batch["embedding"][rows])), threshold))
    a, b = dedup.concat(edges)
    _write_edges(path, _edge_batch(a, b, batch["id"], batch["pixels"]))
    return len(a)


# ---------------------------------------------------------------------------------------------
# The plan (driver)
# ---------------------------------------------------------------------------------------------


def run(work: Loc, n_shards: int, cur: CurationConfig, against: list[Loc] = ()) -> Loc:
    """Dedup over the survivors in `work/scored` (+ `against`); returns the dups file (id, dup_of)."""
    import ray

    d = work / DEDUP_DIR
    dups = d / DUPS
    if dups.has_file():
        return dups
    d.mkdir()
    dc = cur.dedup
    sources = _sources(work, n_shards, against)
    parts = _partitions(n_shards * cur.download.shard_size, dc.partition_rows)
    groups = [[sources[i] for i in g] for g in np.array_split(np.arange(len(sources)), min(len(sources), parts))]
    window = max(16, 8 * int(ray.cluster_resources().get("CPU", 1)))
    steps = []
    if dc.enabled:
        steps.append(_step(d / "hashes", lambda tmp: _hashes(tmp, groups, parts, cur, work, window)))
        if dc.clip_similarity is not None:
            steps.append(_step(d / "clip", lambda tmp: _clip(tmp, groups, parts, cur, work, window)))
    names = [p.name for p in against]
    edges = [s / f"{p:05d}.parquet" for s in steps for p in range(parts)]
    ray.get(ray.remote(num_cpus=1)(_components).remote(edges, dups, names, work))
    return dups


def _partitions(urls: int, rows: int) -> int:
    """Partitions: one per `rows` URLs (download shards are full but the last), at most MAX_PARTITIONS."""
    return max(1, min(-(-urls // rows), MAX_PARTITIONS))


def _step(folder: Loc, build: Callable[[Loc], None]) -> Loc:
    """Write the edge files of `build(tmp)` into `folder` unless committed (storage.staging: on disk a
    temp folder renamed when complete, on a bucket the folder itself with its marker written last)."""
    if storage.committed(folder):
        return folder
    with storage.staging(folder) as tmp:
        (tmp / "map").mkdir()
        build(tmp)
        (tmp / "map").rmtree()  # the shuffle's files: only the edges are kept
    return folder


def _run_tasks(fn, calls: list[tuple], window: int) -> list:
    """`fn` as a Ray task (1 CPU) over `calls`, at most `window` in flight; results in call order."""
    import ray

    task = ray.remote(num_cpus=1)(fn)
    out = dict(gather.bounded(((i, task.remote(*args)) for i, args in enumerate(calls)), window))
    return [out[i] for i in range(len(calls))]


def _hashes(tmp: Loc, groups: list, parts: int, cur: CurationConfig, work: Loc, window: int) -> None:
    """Exact and near duplicates in one shuffle: rows partitioned on (band, value), grouped inside."""
    r = cur.dedup.phash_radius
    maps = [tmp / "map" / f"{g:05d}.arrow" for g in range(len(groups))]
    _run_tasks(_hash_map, [(src, m, r, parts, work) for src, m in zip(groups, maps)], window)
    _run_tasks(
        _hash_reduce,
        [(maps, p, tmp / f"{p:05d}.parquet", r, cur.dedup.max_group, work) for p in range(parts)],
        window,
    )


def _clip(tmp: Loc, groups: list, parts: int, cur: CurationConfig, work: Loc, window: int) -> None:
    dc = cur.dedup
    nodes = [tmp / "map" / f"nodes-{g:05d}.parquet" for g in range(len(groups))]
    n = sum(_run_tasks(_clip_map, [(src, f, work) for src, f in zip(groups, nodes)], window))
    if n == 0:
        return
    import ray

    k = max(1, round(n / dc.cluster_size))
    fraction = min(1.0, dedup.KMEANS_POINTS * k / n)
    centroids = ray.remote(num_cpus=1)(_train).remote(nodes, fraction, k, work)
    maps = [tmp / "map" / f"{g:05d}.arrow" for g in range(len(groups))]
    _run_tasks(_assign, [(f, m, centroids, dc.probe, parts, work) for f, m in zip(nodes, maps)], window)
    _run_tasks(
        _clip_reduce, [(maps, p, tmp / f"{p:05d}.parquet", dc.clip_similarity, work) for p in range(parts)], window
    )


def _components(edges: list[Loc], out: Loc, names: list[str], work: Loc) -> Loc:
    """Ray task: connected components over every edge file (by name: a step with no embeddings at all
    has none); writes (id, dup_of) of this run's duplicates."""
    placement.mark(work, "dedup")
    tables = [storage.read_parquet(p, schema=EDGE_SCHEMA) for p in edges if p.has_file()]
    e = pa.concat_tables(tables) if tables else EDGE_SCHEMA.empty_table()
    a, b = e["a"].to_numpy(), e["b"].to_numpy()
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    pixels = np.zeros(len(nodes), np.int64)
    pixels[inverse] = np.concatenate([e["pa"].to_numpy(), e["pb"].to_numpy()])
    kept = nodes[
        dedup.components(
            inverse[: len(a)], inverse[len(a) :], dedup.keep_rank(nodes, pixels, earlier=nodes >= RUN_SPAN)
        )
    ]
    dup = (kept != nodes) & (nodes < RUN_SPAN)
    table = pa.table(
        {"id": nodes[dup], "dup_of": [dup_name(k, names) for k in kept[dup].tolist()]},
        schema=pa.schema([("id", pa.int64()), ("dup_of", pa.string())]),
    )
    with atomic.atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)  # small groups: each shard reads only its own
    return out


def dup_name(node: int, names: list[str]) -> str:
    """`dup_of` of a node: its key, prefixed `<earlier run's folder name>/` for an earlier run."""
    run, key = divmod(node, RUN_SPAN)
    return f"{key:010d}" if run == 0 else f"{names[run - 1]}/{key:010d}"


def shard_dups(dups: Loc, first_key: str, last_key: str) -> dict[str, str]:
    """{key: dup_of} of one download shard's duplicates (keys are contiguous per shard)."""
    t = storage.read_parquet(dups, filters=[("id", ">=", int(first_key)), ("id", "<=", int(last_key))])
    return {f"{i:010d}": d for i, d in zip(t["id"].to_pylist(), t["dup_of"].to_pylist())}
