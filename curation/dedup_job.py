"""Decisions after scoring, as Ray work: score thresholds and dedup over the whole run (and earlier runs).

    scored/NNNNN.parquet (survivors) [+ earlier runs' dedup_index/] -> Ray Data:
        hashes: one row per (band -1, sha256) and per (pHash band, value) -> shuffle on a hash of
               (band, value) into `partitions` -> each partition sorts its rows into groups: star
               edges for equal sha256, pairs within the radius for a pHash band -> _work/dedup/hashes/
        clip:  k-means (one task, on a sample) -> assign to `probe` clusters -> groupby cluster
               -> cosine pairs                          -> _work/dedup/clip/
    -> one task: connected components over all edges -> _work/dedup/dups.parquet (id, dup_of), sorted

Images are nodes with int64 ids: the key's number for this run, `run * RUN_SPAN + key` for the
run-th `--dedup-against` folder. An earlier run's kept image is written `dup_of = "<folder name>/<key>"`.
Each step's output appears under its final name only when complete, so a rerun resumes after the
last finished step. The driver only builds the plan; it never holds rows.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.config import CurationConfig
from curation import dedup, placement
from shards import atomic, reasons
from shards.errors import SigmaError

RUN_SPAN = 10**10  # keys are 10 digits: ids of the run-th earlier run start at run * RUN_SPAN
DEDUP_DIR = "dedup"  # under _work/
DUPS = "dups.parquet"
INDEX = "dedup_index"  # OUT/dedup_index/NNNNN.parquet: kept images' key, pixels, sha256, phash, embedding
INDEX_COLUMNS = ["key", "pixels", "sha256", "phash", "embedding"]
CANDIDATE_COLUMNS = ["key", "reason", "width", "height", "sha256", "phash", "aesthetic", "nsfw", "watermark",
                     "embedding"]
EDGE_SCHEMA = pa.schema([("a", pa.int64()), ("pa", pa.int64()), ("b", pa.int64()), ("pb", pa.int64())])
ROW_GROUP = 65536  # rows per row group of dups.parquet
MAX_PARTITIONS = 512


class AgainstError(SigmaError):
    """A `--dedup-against` folder that is not a finished run with a dedup index."""


def earlier_runs(folders, out: Path) -> list[Path]:
    """The `--dedup-against` folders, checked: finished runs, distinct names (they prefix `dup_of`)."""
    runs = [Path(f).resolve() for f in folders]
    for r in runs:
        if r == Path(out).resolve():
            raise AgainstError(f"--dedup-against {r}: is the output folder itself")
        if not (r / "manifest.parquet").is_file() or not (r / INDEX).is_dir():
            raise AgainstError(f"--dedup-against {r}: not a finished curation run with {INDEX}/ "
                               "(runs made before incremental dedup have none)")
    names = [r.name for r in runs]
    for n in names:
        if names.count(n) > 1:
            raise AgainstError(f"--dedup-against: two folders named {n!r} (the name prefixes dup_of; rename one)")
    return runs


def score_reasons(reason, aesthetic, nsfw, watermark, cur: CurationConfig) -> np.ndarray:
    """The reason after the score thresholds (NSFW, then watermark, then aesthetic) for each row;
    rows already decided keep theirs. Run where scores are computed, and again (idempotent) here."""
    out = np.array(reason, dtype=object)
    open_ = out == ""
    a, n, w = (np.asarray(x, np.float64) for x in (aesthetic, nsfw, watermark))
    rules = [(cur.nsfw.enabled, n >= cur.nsfw.threshold, reasons.NSFW),
             (cur.watermark.enabled, w >= cur.watermark.threshold, reasons.WATERMARK),
             (cur.aesthetic.enabled, ~(a >= cur.aesthetic.threshold), reasons.LOW_AESTHETIC)]
    for enabled, hit, code in rules:
        if enabled:
            sel = open_ & hit
            out[sel] = code
            open_ &= ~sel
    return out


# ---------------------------------------------------------------------------------------------
# Batch functions (Ray Data workers)
# ---------------------------------------------------------------------------------------------


def _candidates(t: pa.Table, cur: CurationConfig) -> pa.Table:
    """Survivors of one scored batch as dedup nodes: id, pixels, sha256, phash (int64 bits), embedding."""
    r = score_reasons(t["reason"].to_numpy(zero_copy_only=False), _floats(t["aesthetic"]), _floats(t["nsfw"]),
                      _floats(t["watermark"]), cur)
    t = t.filter(pa.array(r == ""))
    pixels = np.asarray(t["width"].to_numpy(zero_copy_only=False), np.int64) * \
        np.asarray(t["height"].to_numpy(zero_copy_only=False), np.int64)
    return _nodes(pc.cast(t["key"], pa.int64()), pixels, t["sha256"], t["phash"], t["embedding"], 0)


def _index_nodes(t: pa.Table, run: int) -> pa.Table:
    """An earlier run's kept images (its dedup_index) as nodes of run `run`."""
    return _nodes(pc.cast(t["key"], pa.int64()), t["pixels"].to_numpy(zero_copy_only=False), t["sha256"], t["phash"],
                  t["embedding"], run)


def _nodes(keys, pixels, sha256, phash, embedding, run: int) -> pa.Table:
    ids = np.asarray(keys, np.int64) + run * RUN_SPAN
    hashes = dedup.phash_int(phash.to_pylist()).view(np.int64)
    return pa.table({"id": ids, "pixels": np.asarray(pixels, np.int64), "sha256": sha256, "phash": hashes,
                     "embedding": embedding})


def _floats(col) -> np.ndarray:
    return pc.fill_null(pc.cast(col, pa.float64()), np.nan).to_numpy(zero_copy_only=False)


def _edge_batch(a: np.ndarray, b: np.ndarray, ids: np.ndarray, pixels: np.ndarray) -> dict:
    """Edges with both ends' pixel counts (the components step needs nothing else)."""
    order = np.argsort(ids)
    where = lambda x: pixels[order[np.searchsorted(ids[order], x)]]
    return {"a": a, "pa": where(a), "b": b, "pb": where(b)}


def _hash_rows(batch: dict, radius: int | None, parts: int) -> dict:
    """Rows to group on: (band -1, sha256 digest) for exact copies, plus one per pHash band; `part`
    spreads the (band, value) groups over the shuffle's partitions."""
    n = len(batch["id"])
    exact = {"band": np.full(n, -1, np.int64),
             "value": np.array([_digest64(h) for h in batch["sha256"]], np.int64),
             "id": batch["id"], "phash": batch["phash"], "sha256": batch["sha256"], "pixels": batch["pixels"]}
    if radius is not None:
        near = dedup.band_rows(batch["id"], batch["phash"].view(np.uint64), radius)
        near["sha256"] = np.full(len(near["id"]), "", dtype=object)
        near["pixels"] = np.tile(batch["pixels"], radius + 1)
        exact = {k: np.concatenate([exact[k], near[k]]) for k in exact}
    exact["part"] = (_mix(exact["value"].view(np.uint64) ^ exact["band"].view(np.uint64)) % np.uint64(parts)) \
        .astype(np.int64)
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


def _hash_partition(batch: dict, work: str, radius: int, max_group: int) -> dict:
    """Edges of one shuffle partition: its rows sorted into (band, value) groups; a group joins images
    with the same sha256 (band -1) or pHashes within `radius` (a pHash band). Most groups are
    singletons or pairs, so pairs are decided vectorised and only larger groups loop."""
    placement.mark(work, "dedup")
    band, value = batch["band"], batch["value"]
    order = np.lexsort((value, band))
    band, value = band[order], value[order]
    starts = np.flatnonzero(np.r_[True, (band[1:] != band[:-1]) | (value[1:] != value[:-1])])
    size = np.diff(np.r_[starts, len(order)])
    ids, phash, sha = batch["id"], batch["phash"].view(np.uint64), batch["sha256"]
    s2 = starts[size == 2]
    i, j = order[s2], order[s2 + 1]
    same = np.where(band[s2] == -1, sha[i] == sha[j], np.bitwise_count(phash[i] ^ phash[j]) <= radius)
    parts = [(ids[i[same]], ids[j[same]])]
    for s, n in zip(starts[size > 2].tolist(), size[size > 2].tolist()):
        rows = order[s:s + n]
        if band[s] == -1:
            parts.append(dedup.exact_edges(ids[rows], sha[rows]))
        else:
            parts.append(dedup.near_edges(ids[rows], phash[rows], radius, max_group))
    a, b = dedup.concat(parts)
    return _edge_batch(a, b, ids, batch["pixels"])


def _embeddings(column) -> np.ndarray:
    return np.stack([np.frombuffer(e, np.float16) for e in column]).astype(np.float32)


def _assign(batch: dict, centroids: list, probe: int) -> dict:
    import ray

    near = dedup.assign(_embeddings(batch["embedding"]), ray.get(centroids[0]), probe)  # [n, probe]
    p = near.shape[1]
    return {"cluster": near.reshape(-1).astype(np.int64), "id": np.repeat(batch["id"], p),
            "pixels": np.repeat(batch["pixels"], p), "embedding": np.repeat(batch["embedding"], p)}


def _clip_group(batch: dict, work: str, threshold: float) -> dict:
    placement.mark(work, "dedup")
    a, b = dedup.semantic_edges(batch["id"], dedup.normalise(_embeddings(batch["embedding"])), threshold)
    return _edge_batch(a, b, batch["id"], batch["pixels"])


def _train(refs: list, k: int, work: str) -> np.ndarray:
    """Ray task: k-means centroids from a sample of embeddings (blocks of the sampled dataset)."""
    import ray

    placement.mark(work, "dedup")
    blocks = [ray.get(r)["embedding"] for r in refs]
    return dedup.kmeans(_embeddings(np.concatenate([b for b in blocks if len(b)])), k)


# ---------------------------------------------------------------------------------------------
# The plan (driver)
# ---------------------------------------------------------------------------------------------


def run(work: Path, n_shards: int, cur: CurationConfig, against: list[Path] = ()) -> Path:
    """Thresholds + dedup over the survivors in `work/scored`; returns the dups file (id, dup_of)."""
    d = work / DEDUP_DIR
    dups = d / DUPS
    if dups.exists():
        return dups
    d.mkdir(parents=True, exist_ok=True)
    dc = cur.dedup
    steps = []
    if dc.enabled:
        steps.append(_step(d / "hashes", lambda: _hashes(work, n_shards, cur, against)))
        if dc.clip_similarity is not None:
            steps.append(_step(d / "clip", lambda: _clip(work, n_shards, cur, against)))
    import ray

    names = [p.name for p in against]
    ray.get(ray.remote(num_cpus=1)(_components).remote([str(s) for s in steps], str(dups), names, str(work)))
    return dups


def _partitions(n_shards: int) -> int:
    """Shuffle partitions: one per download shard (~1000 URLs), at most MAX_PARTITIONS."""
    return max(1, min(n_shards, MAX_PARTITIONS))


def _step(folder: Path, build) -> Path:
    """Write the edges dataset `build()` to `folder` unless done (temp folder renamed when complete)."""
    if folder.exists():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    build().write_parquet(str(tmp))
    tmp.mkdir(exist_ok=True)  # no edges: Ray writes no file, nor the folder
    os.replace(tmp, folder)
    return folder


def _nodes_ds(work: Path, n_shards: int, cur: CurationConfig, against, columns: list[str]):
    """All dedup nodes: this run's survivors + the earlier runs' kept images, projected to `columns`."""
    import ray

    scored = [str(work / "scored" / f"{i:05d}.parquet") for i in range(n_shards)]
    ds = ray.data.read_parquet(scored).select_columns(CANDIDATE_COLUMNS).map_batches(
        _candidates, batch_format="pyarrow", fn_kwargs={"cur": cur}).select_columns(columns)
    for run, folder in enumerate(against, 1):
        files = sorted(str(p) for p in (Path(folder) / INDEX).glob("*.parquet"))
        if files:
            ds = ds.union(ray.data.read_parquet(files).select_columns(INDEX_COLUMNS).map_batches(
                _index_nodes, batch_format="pyarrow", fn_kwargs={"run": run}).select_columns(columns))
    return ds


def _hashes(work: Path, n_shards: int, cur: CurationConfig, against):
    """Exact and near duplicates in one shuffle: rows partitioned on (band, value), grouped inside."""
    r = cur.dedup.phash_radius
    ds = _nodes_ds(work, n_shards, cur, against, ["id", "pixels", "sha256", "phash"])
    parts = _partitions(n_shards)
    ds = ds.map_batches(_hash_rows, batch_format="numpy", fn_kwargs={"radius": r, "parts": parts})
    return ds.groupby("part", num_partitions=parts).map_groups(
        _hash_partition, batch_format="numpy", fn_kwargs={"work": str(work), "radius": r,
                                                          "max_group": cur.dedup.max_group})


def _clip(work: Path, n_shards: int, cur: CurationConfig, against):
    import ray

    dc = cur.dedup
    ds = _nodes_ds(work, n_shards, cur, against, ["id", "pixels", "embedding"]).filter(
        lambda r: len(r["embedding"] or b"") > 0).materialize()
    n = ds.count()
    if n == 0:
        return ds.select_columns(["id"]).map_batches(lambda b: {k: np.zeros(0, np.int64) for k in EDGE_SCHEMA.names})
    k = max(1, round(n / dc.cluster_size))
    sample = ds.random_sample(min(1.0, dedup.KMEANS_POINTS * k / n), seed=0) if n > dedup.KMEANS_POINTS * k else ds
    refs = sample.select_columns(["embedding"]).to_numpy_refs()
    centroids = ray.remote(num_cpus=1)(_train).remote(refs, k, str(work))
    ds = ds.map_batches(_assign, batch_format="numpy", fn_kwargs={"centroids": [centroids], "probe": dc.probe})
    return ds.groupby("cluster", num_partitions=_partitions(n_shards)).map_groups(_clip_group, batch_format="numpy",
                                            fn_kwargs={"work": str(work), "threshold": dc.clip_similarity})


def _components(steps: list[str], out: str, names: list[str], work: str) -> str:
    """Ray task: connected components over every edge; writes (id, dup_of) of this run's duplicates."""
    placement.mark(work, "dedup")
    tables = [pq.read_table(p, schema=EDGE_SCHEMA) for p in steps if any(Path(p).glob("*.parquet"))]
    e = pa.concat_tables(tables) if tables else EDGE_SCHEMA.empty_table()
    a, b = e["a"].to_numpy(), e["b"].to_numpy()
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    pixels = np.zeros(len(nodes), np.int64)
    pixels[inverse] = np.concatenate([e["pa"].to_numpy(), e["pb"].to_numpy()])
    # keep rule: an earlier run's image first, then highest resolution, then smallest key
    rank = np.empty(len(nodes), np.int64)
    rank[np.lexsort((nodes, -pixels, nodes < RUN_SPAN))] = np.arange(len(nodes))
    kept = nodes[dedup.components(inverse[:len(a)], inverse[len(a):], rank)]
    dup = (kept != nodes) & (nodes < RUN_SPAN)
    table = pa.table({"id": nodes[dup], "dup_of": [dup_name(k, names) for k in kept[dup].tolist()]})
    with atomic.atomic_path(out) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP)  # small groups: each shard reads only its own
    return out


def dup_name(node: int, names: list[str]) -> str:
    """`dup_of` of a node: its key, prefixed `<earlier run's folder name>/` for an earlier run."""
    run, key = divmod(node, RUN_SPAN)
    return f"{key:010d}" if run == 0 else f"{names[run - 1]}/{key:010d}"


def shard_dups(dups: Path, first_key: str, last_key: str) -> dict[str, str]:
    """{key: dup_of} of one download shard's duplicates (keys are contiguous per shard)."""
    t = pq.read_table(dups, filters=[("id", ">=", int(first_key)), ("id", "<=", int(last_key))])
    return {f"{i:010d}": d for i, d in zip(t["id"].to_pylist(), t["dup_of"].to_pylist())}
