"""The test oracle: curation's decisions in one process, holding every survivor in memory.

The pipeline decides as Ray work (thresholds in the scoring actor, `curation/dedup_job.py` for
dedup); tests compare it with these, which call the same rules (`pipeline.score_reasons`,
`dedup`'s edges, components and keep rank) with no Ray and no files between the steps.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.config import CurationConfig
from curation import dedup, pipeline
from curation.dedup_job import CANDIDATE_COLUMNS
from shards import reasons


def find_duplicates(
    keys: list[str],
    pixels: list[int],
    sha256: list[str],
    phash: list[str | None],
    embeddings: np.ndarray | None,
    phash_radius: int | None,
    clip_similarity: float | None,
) -> dict[str, str]:
    """{duplicate key: kept key} over all candidates, in one process. CLIP: exact, all pairs."""
    ids = np.arange(len(keys), dtype=np.int64)
    parts = [dedup.exact_edges(ids, np.array(sha256, dtype=object))]
    if phash_radius is not None:
        has = np.array([bool(h) for h in phash])
        hashes = dedup.phash_int([h for h in phash if h])
        rows = dedup.band_rows(ids[has], hashes, phash_radius)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for j, key in enumerate(zip(rows["band"].tolist(), rows["value"].tolist())):
            groups[key].append(j)
        for js in groups.values():
            if len(js) > 1:
                js = np.array(js)
                parts.append(dedup.near_edges(rows["id"][js], rows["phash"][js].view(np.uint64), phash_radius))
    if clip_similarity is not None and embeddings is not None:
        has = np.any(embeddings != 0, axis=1)
        parts.append(dedup.semantic_edges(ids[has], dedup.normalise(embeddings[has]), clip_similarity))
    a, b = dedup.concat(parts)
    kept = dedup.components(a, b, dedup.keep_rank(np.array(keys), pixels))
    return {keys[i]: keys[k] for i, k in enumerate(kept.tolist()) if k != i}


def decide(scored: Path, n_shards: int, cur: CurationConfig) -> dict[str, tuple[str, str | None]]:
    """{key: (reason, dup_of)} for rows that survived measuring but are dropped by scores (replayed on
    the recorded scores with `cur`'s thresholds) or dedup."""
    cols = CANDIDATE_COLUMNS + ["aesthetic", "nsfw", "watermark"]
    t = pa.concat_tables([pq.read_table(scored / f"{i:05d}.parquet", columns=cols) for i in range(n_shards)])
    t = t.filter(pc.is_in(t["reason"], pa.array(["", *pipeline.SCORE_REASONS])))  # passed measuring
    floats = [
        np.array([np.nan if v is None else v for v in t[c].to_pylist()], np.float64)
        for c in ("aesthetic", "nsfw", "watermark")
    ]
    final = pipeline.score_reasons(np.full(len(t), "", dtype=object), *floats, cur)
    out = {k: (r, None) for k, r in zip(t["key"].to_pylist(), final.tolist()) if r}
    t = t.filter(pa.array(final == ""))
    if cur.dedup.enabled and len(t):
        emb = None
        if cur.dedup.clip_similarity is not None:
            raw = t["embedding"].to_pylist()
            dim = max((len(e) // 2 for e in raw), default=0)
            emb = np.zeros((len(raw), max(dim, 1)), np.float32)
            for j, e in enumerate(raw):
                if e:
                    emb[j] = np.frombuffer(e, np.float16)
        pixels = [w * h for w, h in zip(t["width"].to_pylist(), t["height"].to_pylist())]
        dups = find_duplicates(
            t["key"].to_pylist(),
            pixels,
            t["sha256"].to_pylist(),
            t["phash"].to_pylist(),
            emb,
            cur.dedup.phash_radius,
            cur.dedup.clip_similarity,
        )
        out.update({k: (reasons.DUPLICATE, v) for k, v in dups.items()})
    return out
