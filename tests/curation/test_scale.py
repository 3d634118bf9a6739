"""Dedup at scale: the split guard and clustered semantic dedup against brute force; the distributed
decisions (Ray Data) against the in-process ones; resuming after a finished dedup step."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation import dedup, dedup_job, pipeline
from shards import reasons, storage
from shards.errors import SigmaError
from tests.curation import oracle
from tests.curation.test_pipeline import demo_cfg


def _pairs(a, b) -> set[tuple[int, int]]:
    return {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())}


def _brute_near(hashes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    i, j = np.nonzero(np.triu(d <= radius, 1))
    return set(zip(i.tolist(), j.tolist()))


def _component_labels(n: int, pairs) -> np.ndarray:
    a, b = (np.array(x, np.int64) for x in zip(*pairs)) if pairs else (np.zeros(0, np.int64),) * 2
    return dedup.components(a, b, np.arange(n))


def test_oversized_band_group_guard():
    """600 near-constant hashes (flat images) in one band group: identical ones are a star; windows of
    64 find only true pairs, and with the cap above the group's size exactly brute force's components."""
    rng = np.random.default_rng(0)
    base = 0x00FF00FF00FF00FF
    hashes = np.array(
        [base ^ sum(1 << int(b) for b in rng.integers(0, 64, size=rng.integers(0, 4))) for _ in range(600)], np.uint64
    )
    hashes[:100] = base  # identical hashes: a star, never pairwise
    ids = np.arange(len(hashes), dtype=np.int64)
    truth = _brute_near(hashes, 4)
    windowed = _pairs(*dedup.near_edges(ids, hashes, 4, max_group=64))
    assert windowed <= truth and len(windowed) < len(truth) / 10
    exact = _pairs(*dedup.near_edges(ids, hashes, 4, max_group=1000))
    assert exact <= truth
    assert (_component_labels(len(ids), exact) == _component_labels(len(ids), truth)).all()


def test_band_groups_find_every_pair_within_radius():
    rng = np.random.default_rng(1)
    bases = rng.integers(0, 2**63, size=40, dtype=np.int64).astype(np.uint64)
    hashes = np.array(
        [
            int(bases[i % 40]) ^ sum(1 << int(x) for x in rng.integers(0, 64, size=rng.integers(0, 4)))
            for i in range(400)
        ],
        np.uint64,
    )
    keys = [f"{i:010d}" for i in range(len(hashes))]
    out = oracle.find_duplicates(keys, [1] * len(keys), keys, [f"{int(h):016x}" for h in hashes], None, 4, None)
    truth = _component_labels(len(keys), _brute_near(hashes, 4))
    assert {k: v for k, v in out.items()} == {keys[i]: keys[int(t)] for i, t in enumerate(truth) if t != i}


def test_semantic_dedup_recall_vs_brute_force():
    """SemDeDup-style k-means + per-cluster cosine finds >= 99% of the pairs brute force finds."""
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(50, 64)).astype(np.float32)
    base = centers[rng.integers(0, 50, size=3000)] + 0.6 * rng.normal(size=(3000, 64)).astype(np.float32)
    near = base[rng.integers(0, 3000, size=1000)] + 0.08 * rng.normal(size=(1000, 64)).astype(np.float32)
    emb = dedup.normalise(np.concatenate([base, near]))
    ids = np.arange(len(emb), dtype=np.int64)
    truth = _pairs(*dedup.semantic_edges(ids, emb, 0.95))
    found = _pairs(*dedup.clustered_edges(ids, emb, 0.95, cluster_size=200, probe=2))
    assert len(truth) >= 800 and found <= truth
    assert len(found) / len(truth) >= 0.99


def _scored_shards(tmp_path, n_shards=3, per=40, dim=16):
    """Synthetic scored shards: exact copies, near pHash copies, CLIP copies across shards; a few rejected."""
    rng = np.random.default_rng(3)
    base_h = rng.integers(0, 2**63, size=n_shards * per, dtype=np.int64)
    base_e = dedup.normalise(rng.normal(size=(n_shards * per, dim)))
    scored = tmp_path / "_work" / "scored"
    for s in range(n_shards):
        rows = []
        for r in range(per):
            i = s * per + r
            src = i - 1 if i % 5 == 0 and i else i  # every 5th: a copy of the one before
            h, e = int(base_h[src]), base_e[src].copy()
            sha = f"sha{src}" if i % 10 == 0 else f"sha{i}"  # half of the copies are exact
            if i % 5 == 0 and i % 10:
                h ^= 1 << int(rng.integers(0, 64))
                e = e + 0.01 * rng.normal(size=dim)
            if i % 15 == 3:  # a third kind: only the embedding is close (other pHash)
                e = base_e[(i + 1) % len(base_e)] + 0.01 * rng.normal(size=dim)
            side = 1024 + int(rng.integers(0, 4)) * 256
            rows.append(
                {
                    "key": f"{i:010d}",
                    "url": f"http://h/{i}",
                    "reason": "too_small" if i % 17 == 1 else "",
                    "width": side,
                    "height": 1024,
                    "tier": "1k",
                    "ext": "jpg",
                    "sharpness": 1.0,
                    "contrast": 1.0,
                    "brightness": 1.0,
                    "sha256": sha,
                    "phash": f"{h & (2**64 - 1):016x}",
                    "aesthetic": 5.0,
                    "nsfw": None,
                    "watermark": None,
                    "src": "",
                    "offset": 0,
                    "size": 0,
                    "embedding": dedup.normalise(e[None])[0].astype(np.float16).tobytes(),
                    "t_measure": 0.0,
                    "t_embed": 0.0,
                }
            )
        pipeline.write_scored(scored / f"{s:05d}.parquet", rows)
    return tmp_path / "_work", n_shards


@pytest.mark.slow
def test_distributed_decisions_equal_in_process_and_resume(ray_local, tmp_path):
    work, n = _scored_shards(tmp_path)
    cur = demo_cfg(
        "curation.dedup.clip_similarity=0.98",
        "curation.dedup.cluster_size=40",
        "curation.dedup.max_group=2",
        "curation.dedup.partition_rows=5",  # a partition per download shard: rows cross the shuffle
    ).curation
    dups = dedup_job.run(storage.resolve(str(work)), n, cur)
    t = pq.read_table(dups.path)
    got = dict(zip([f"{i:010d}" for i in t["id"].to_pylist()], t["dup_of"].to_pylist()))
    expected = {k: d for k, (r, d) in oracle.decide(work / "scored", n, cur).items() if r == reasons.DUPLICATE}
    assert got == expected and len(got) >= 20
    steps = {p: p.stat().st_mtime_ns for p in (work / "dedup").iterdir()}
    assert sorted(p.name for p in steps) == ["clip", "dups.parquet", "hashes"]
    parts = dedup_job._partitions(n * cur.download.shard_size, cur.dedup.partition_rows)
    assert parts == 3 and len(list((work / "dedup" / "hashes").glob("*.parquet"))) == parts  # one per partition
    (work / "dedup" / "clip").rename(work / "dedup" / "clip.tmp")  # as if killed while writing clip edges
    dups.unlink()
    assert dedup_job.run(storage.resolve(str(work)), n, cur) == dups and pq.read_table(dups.path).equals(t)
    for p, mtime in steps.items():
        if p.name == "hashes":
            assert p.stat().st_mtime_ns == mtime  # finished steps are not redone


def test_shuffle_files_hold_one_batch_per_partition(tmp_path):
    rows = {
        "band": np.array([5, 6, 7, 8]),
        "value": np.arange(4),
        "id": np.array([10, 11, 12, 13]),
        "phash": np.zeros(4, np.int64),
        "sha256": np.array(["a", "b", "c", "d"], dtype=object),
        "pixels": np.ones(4, np.int64),
        "part": np.array([3, 0, 3, 1]),
    }
    files = []
    for g in range(2):
        files.append(storage.resolve(str(tmp_path / f"{g}.arrow")))
        dedup_job._write_parts(files[-1], rows, dedup_job.HASH_SCHEMA, 5)
    got = {p: dedup_job._read_part(files, p)["id"].tolist() for p in range(5)}
    assert got == {0: [11, 11], 1: [13, 13], 2: [], 3: [10, 12, 10, 12], 4: []}


def test_dedup_config_ranges():
    with pytest.raises(SigmaError, match="curation.dedup.probe"):
        demo_cfg("curation.dedup.probe=0")
