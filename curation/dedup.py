"""Duplicates across the whole run: exact (sha256), near (perceptual hash), semantic (CLIP).

Candidates are visited from the highest resolution down (ties: smallest key), and each is
compared only with the images already kept, so every duplicate points at a kept image (`dup_of`)
and the kept member of a group is its highest-resolution one.

Near duplicates: two 64-bit pHashes within Hamming radius r agree exactly on at least one of
r + 1 disjoint bands (pigeonhole), so a band -> keys index finds all candidates without
comparing every pair. CLIP similarity compares against the kept embeddings in blocks
(O(n * kept); fine to ~10^5 images per run, beyond that put a vector index here).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np


def phash_hex(grey) -> str:
    """64-bit DCT perceptual hash of a PIL image, as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(grey))


def _bands(h: int, n: int) -> list[tuple[int, int]]:
    """(band index, band value) of a 64-bit hash cut into n near-equal bands."""
    out, start = [], 0
    for i in range(n):
        width = 64 // n + (1 if i < 64 % n else 0)
        out.append((i, (h >> start) & ((1 << width) - 1)))
        start += width
    return out


def find_duplicates(keys: list[str], pixels: list[int], sha256: list[str], phash: list[str | None],
                    embeddings: np.ndarray | None, phash_radius: int | None,
                    clip_similarity: float | None) -> dict[str, str]:
    """{duplicate key: kept key} over all candidates (kept ones are absent)."""
    order = sorted(range(len(keys)), key=lambda i: (-pixels[i], keys[i]))
    by_sha: dict[str, str] = {}
    bands: dict[tuple[int, int], list[int]] = defaultdict(list)
    nbands = (phash_radius or 0) + 1
    kept_idx: list[int] = []
    kept_emb = np.zeros_like(embeddings, dtype=np.float32) if embeddings is not None else None  # first len(kept_idx) rows used
    dup_of: dict[str, str] = {}
    for i in order:
        target = by_sha.get(sha256[i])
        h = int(phash[i], 16) if phash[i] and phash_radius is not None else None
        if target is None and h is not None:
            near = {j for b in _bands(h, nbands) for j in bands.get(b, ())}
            close = [j for j in sorted(near, key=lambda j: keys[j])
                     if bin(h ^ int(phash[j], 16)).count("1") <= phash_radius]
            target = keys[close[0]] if close else None
        if target is None and clip_similarity is not None and embeddings is not None and len(kept_idx):
            if np.any(embeddings[i]):
                sims = kept_emb[:len(kept_idx)] @ embeddings[i]  # [kept]
                j = int(np.argmax(sims))
                target = keys[kept_idx[j]] if sims[j] >= clip_similarity else None
        if target is not None:
            dup_of[keys[i]] = target
            continue
        by_sha[sha256[i]] = keys[i]
        if h is not None:
            for b in _bands(h, nbands):
                bands[b].append(i)
        if kept_emb is not None:
            kept_emb[len(kept_idx)] = embeddings[i]
        kept_idx.append(i)
    return dup_of
