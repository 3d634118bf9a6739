"""Duplicates as a graph: edges from exact (sha256), near (pHash) and semantic (CLIP) matches, then
connected components; each component keeps one image, and the others point at it (`dup_of`).

Kept member: the highest-resolution image (ties: the smallest key); an earlier run's kept image
always wins over a new one (it is already published). These functions are pure (numpy arrays in,
edge arrays out), run as Ray tasks over partitions by `curation/dedup_job.py` (and in one process by
the tests' oracle, tests/curation/oracle.py).

Near duplicates: two 64-bit pHashes within Hamming radius r agree exactly on at least one of r + 1
disjoint bands (pigeonhole), so only hashes sharing a (band, band value) are compared. A group is
first collapsed to its distinct hashes (identical hashes, e.g. flat images, are one star of edges,
never compared pairwise); its distinct hashes are then compared all pairs, exactly, in vectorised
blocks. Guard: a group of more than `max_group` distinct hashes (near-constant images colliding in
one band) is split into windows of `max_group` consecutive sorted hashes, each compared with itself
and the next window: O(n * max_group) work instead of O(n^2), at the price of missing pairs that lie
further apart in sorted order (such groups are rare among survivors: flat images fail `low_quality`).

Semantic duplicates (SemDeDup, as NVIDIA NeMo Curator does it): k-means over the embeddings, each
embedding assigned to its `probe` nearest centroids, cosine similarity only inside a cluster.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import pairwise

import numpy as np

BLOCK = 2048  # rows per block of pairwise comparisons: a 2048 x n slab at a time
KMEANS_POINTS = 64  # k-means training points per centroid (faiss wants >= 39)


def phash_hex(grey) -> str:
    """64-bit DCT perceptual hash of a PIL image, as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(grey))


def phash_int(hexes) -> np.ndarray:
    """16-hex-digit pHashes as uint64 (the bit pattern; "" or None -> 0, callers drop those)."""
    return np.array([int(h, 16) if h else 0 for h in hexes], dtype=np.uint64)


def band_masks(bits: list[int], n: int) -> list[np.uint64]:
    """`bits` (positions) cut into n near-equal runs, each as a mask."""
    out, start = [], 0
    for i in range(n):
        width = len(bits) // n + (1 if i < len(bits) % n else 0)
        out.append(np.uint64(sum(1 << b for b in bits[start : start + width])))
        start += width
    return out


ALL_BITS = list(range(64))


def _star(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.full(len(ids) - 1, ids[0], np.int64), np.asarray(ids[1:], np.int64)


def concat(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])


def exact_edges(ids: np.ndarray, sha256: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining images with the same sha256 (a star per digest)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in zip(ids.tolist(), sha256.tolist()):
        groups[s].append(i)
    return concat([_star(np.array(g)) for g in groups.values() if len(g) > 1])


def near_edges(
    ids: np.ndarray, hashes: np.ndarray, radius: int, max_group: int = 50_000
) -> tuple[np.ndarray, np.ndarray]:
    """Edges between images of one band group whose pHashes are within `radius` (see the module
    docstring for the guard on oversized groups)."""
    order = np.argsort(hashes, kind="stable")
    ids, hashes = np.asarray(ids, np.int64)[order], hashes[order]
    uniq, first = np.unique(hashes, return_index=True)
    bounds = list(first) + [len(hashes)]
    parts = [_star(ids[s:e]) for s, e in pairwise(bounds) if e - s > 1]
    reps = ids[first]  # one image per distinct hash
    for s in range(0, len(uniq), max_group):  # one window unless the group is oversized
        parts.append(_pairs_within(reps[s : s + 2 * max_group], uniq[s : s + 2 * max_group], radius, max_group))
    return concat(parts)


def _pairs_within(ids: np.ndarray, hashes: np.ndarray, radius: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j within `radius` for i among the `first` rows, in blocks (vectorised XOR + popcount)."""
    parts = []
    for s in range(0, min(first, len(ids)), BLOCK):
        d = np.bitwise_count(hashes[s : min(s + BLOCK, first), None] ^ hashes[None, :])
        i, j = np.nonzero(d <= radius)
        keep = j > i + s
        parts.append((ids[i[keep] + s], ids[j[keep]]))
    return concat(parts)


def band_rows(ids: np.ndarray, hashes: np.ndarray, radius: int) -> dict[str, np.ndarray]:
    """One row per (image, band): band index, band value (as int64 bits), id, hash (as int64 bits)."""
    masks = band_masks(ALL_BITS, radius + 1)
    n = len(ids)
    return {
        "band": np.repeat(np.arange(len(masks), dtype=np.int64), n),
        "value": np.concatenate([hashes & m for m in masks]).view(np.int64),
        "id": np.tile(np.asarray(ids, np.int64), len(masks)),
        "phash": np.tile(hashes, len(masks)).view(np.int64),
    }


def semantic_edges(ids: np.ndarray, emb: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges between embeddings (rows L2-normalised) with cosine similarity >= threshold."""
    emb = np.asarray(emb, np.float32)
    parts = []
    for s in range(0, len(ids), BLOCK):
        sims = emb[s : s + BLOCK] @ emb.T
        i, j = np.nonzero(sims >= threshold)
        keep = j > i + s
        parts.append((np.asarray(ids)[i[keep] + s], np.asarray(ids)[j[keep]]))
    return concat(parts)


def normalise(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, np.float32)
    norm = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norm > 0, norm, 1)


def kmeans(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k centroids (spherical k-means, faiss; on the GPU when faiss sees one)."""
    import faiss

    sample = np.ascontiguousarray(normalise(sample))
    k = max(1, min(k, len(sample)))
    km = faiss.Kmeans(
        sample.shape[1], k, niter=20, seed=seed, spherical=True, gpu=faiss.get_num_gpus() > 0, verbose=False
    )
    km.train(sample)
    return km.centroids


def assign(emb: np.ndarray, centroids: np.ndarray, probe: int) -> np.ndarray:
    """[n, probe] indices of each embedding's nearest centroids (inner product on unit vectors)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, np.float32))
    _, nearest = index.search(np.ascontiguousarray(normalise(emb)), min(probe, len(centroids)))
    return nearest


def clustered_edges(
    ids: np.ndarray, emb: np.ndarray, threshold: float, cluster_size: int, probe: int
) -> tuple[np.ndarray, np.ndarray]:
    """`semantic_edges` inside k-means clusters, in one process (what dedup_job.py spreads over tasks)."""
    emb = normalise(emb)
    k = max(1, round(len(ids) / cluster_size))
    rng = np.random.default_rng(0)
    sample = emb[rng.choice(len(emb), min(len(emb), KMEANS_POINTS * k), replace=False)]
    near = assign(emb, kmeans(sample, k), probe)
    clusters, rows = near.reshape(-1), np.repeat(np.arange(len(ids)), near.shape[1])
    order = np.argsort(clusters, kind="stable")
    _, starts = np.unique(clusters[order], return_index=True)
    parts = []
    for members in np.split(rows[order], starts[1:]):
        parts.append(semantic_edges(np.asarray(ids)[members], emb[members], threshold))
    return concat(parts)


def components(a: np.ndarray, b: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For nodes 0..n-1 joined by edges (a, b): the node each one's component keeps, i.e. its
    member with the lowest `rank` (callers rank by their keep rule)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(rank)
    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    order = np.lexsort((rank, label))  # by component, then rank
    first = np.r_[True, label[order][1:] != label[order][:-1]] if n else np.zeros(0, bool)
    best = np.empty(label.max() + 1 if n else 0, np.int64)
    best[label[order][first]] = order[first]
    return best[label]


def keep_rank(ids: np.ndarray, pixels: np.ndarray, earlier: np.ndarray | None = None) -> np.ndarray:
    """Each node's rank under the keep rule (0 = kept first): an earlier run's image, then the
    highest resolution, then the smallest id (ids are keys in order)."""
    ids, pixels = np.asarray(ids), np.asarray(pixels, np.int64)
    earlier = np.zeros(len(ids), bool) if earlier is None else np.asarray(earlier, bool)
    rank = np.empty(len(ids), np.int64)
    rank[np.lexsort((ids, -pixels, ~earlier))] = np.arange(len(ids))
    return rank
