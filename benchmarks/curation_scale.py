"""Curation after scoring at scale: decide + write over synthetic scored shards, and semantic dedup.

    python -m benchmarks.curation_scale [--rows 100000,1000000] [--embeddings 100000,1000000] [--old 10000,20000]

1. decide + write (no downloading): synthetic download shards of 1000 rows (input, scored rows with
   sha256 / pHash / 32-d embeddings, ~10% exact and ~10% near copies, a byte blob standing in for
   the download tar), then `dedup_job.run` + `outputs.write` + `summarize` in a fresh driver process
   on a local Ray (2 CPUs): the driver's peak RSS (getrusage) and the wall time.
2. Semantic dedup on random 768-d embeddings with planted near copies: SemDeDup-style
   `dedup.clustered_edges` vs the loop curation used before (each image against every kept one),
   and recall against exact brute force (`dedup.semantic_edges` over all pairs).
Writes benchmarks/results/curation_scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation_scale.md"
SHARD = 1000
DIM = 32


def synth(root: Path, n: int, seed: int = 0) -> int:
    """Write n rows of synthetic scored download shards under root/_work; returns the shard count."""
    from curation import pipeline

    rng = np.random.default_rng(seed)
    work = root / "_work"
    shards = (n + SHARD - 1) // SHARD
    blob = root / "downloads"
    blob.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        keys = [f"{i:010d}" for i in range(s * SHARD, min(n, (s + 1) * SHARD))]
        m = len(keys)
        base = rng.integers(0, 2**63, size=m, dtype=np.int64)
        emb = rng.normal(size=(m, DIM)).astype(np.float32)
        copy = rng.random(m) < 0.2  # copies of the row before: half exact, half near
        exact = copy & (rng.random(m) < 0.5)
        sha = [f"{s:05d}{j:06d}" for j in range(m)]
        for j in np.nonzero(copy)[0][np.nonzero(copy)[0] > 0]:
            base[j] = base[j - 1] ^ (0 if exact[j] else 1 << int(rng.integers(0, 62)))
            emb[j] = emb[j - 1]
            if exact[j]:
                sha[j] = sha[j - 1]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        data = rng.bytes(64 * m)
        (blob / f"{s:05d}.tar").write_bytes(data)
        pq.write_table(
            pa.table(
                {"key": keys, "url": [f"http://h/{k}.jpg" for k in keys], "caption": [f"photo {k}" for k in keys]}
            ),
            _mk(work / "input" / f"{s:05d}.parquet"),
        )
        side = rng.integers(1024, 2048, size=m)
        rows = [
            {
                "key": k,
                "url": f"http://h/{k}.jpg",
                "reason": "too_small" if j % 20 == 7 else "",
                "width": int(side[j]),
                "height": 1024,
                "tier": "1k",
                "ext": "jpg",
                "sharpness": 50.0,
                "contrast": 30.0,
                "brightness": 120.0,
                "sha256": sha[j],
                "phash": f"{int(base[j]) & (2**64 - 1):016x}",
                "aesthetic": 5.5,
                "nsfw": None,
                "watermark": None,
                "src": str(blob / f"{s:05d}.tar"),
                "offset": 64 * j,
                "size": 64,
                "embedding": emb[j].astype(np.float16).tobytes(),
                "t_measure": 0.0,
                "t_embed": 0.0,
            }
            for j, k in enumerate(keys)
        ]
        pipeline.write_scored(work / "scored" / f"{s:05d}.parquet", rows)
    return shards


def _mk(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


CHILD = """
import json, resource, sys, time
from pathlib import Path
import ray
from common import config
from curation import dedup_job, outputs, pipeline
out, n_shards = Path(sys.argv[1]), int(sys.argv[2])
cfg = config.load("pipelines.yaml", "demo", ["curation.dedup.clip_similarity=0.97", "curation.dedup.cluster_size=2000",
                                             "curation.shard_size=1000", "curation.download.shard_size=1000"])
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
t0 = time.time()
dups = dedup_job.run(out / "_work", n_shards, cfg.curation)
t1 = time.time()
rss_decide = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
written = outputs.write(out, n_shards, dups, cfg.curation)
stats = pipeline.summarize(out, out / "_work", n_shards, {}, written)
t2 = time.time()
print("RESULT", json.dumps({"decide": t1 - t0, "write": t2 - t1, "kept": written["kept"],
                            "dup": stats["reason"].get("duplicate", 0),
                  "rss_decide_mib": rss_decide, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def decide_write(n: int) -> dict:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        root = Path(tmp)
        shards = synth(root, n)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
        r = subprocess.run(
            [sys.executable, "-c", CHILD, str(root), str(shards)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode:
            sys.exit(r.stderr[-3000:])
        result = [line for line in r.stdout.splitlines() if line.startswith("RESULT ")]
        if not result:
            sys.exit(f"no result from the child:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        return {"rows": n, **json.loads(result[-1][len("RESULT ") :])}


def old_loop(emb: np.ndarray, threshold: float) -> int:
    """The pre-issue-13 CLIP check: each image (by resolution) against every kept one, in order."""
    kept = np.zeros_like(emb)
    n_kept = 0
    for e in emb:
        if n_kept and float(np.max(kept[:n_kept] @ e)) >= threshold:
            continue
        kept[n_kept] = e
        n_kept += 1
    return len(emb) - n_kept


def planted(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal(size=(n, 768), dtype=np.float32)
    copies = rng.random(n) < 0.1
    src = rng.integers(0, n, size=n)
    emb[copies] = emb[src[copies]] + 0.015 * rng.standard_normal(size=(int(copies.sum()), 768), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def _pairs(a: np.ndarray, b: np.ndarray) -> set:
    return set(zip(np.minimum(a, b).tolist(), np.maximum(a, b).tolist()))


def semantic(n: int, brute: bool, queries: int) -> dict:
    """Clustered edges; recall vs brute force over all pairs (`brute`) or over the pairs of `queries`
    random embeddings against all n (exact for those rows: an unbiased sample of the true pairs)."""
    from curation import dedup

    emb, ids = planted(n), np.arange(n, dtype=np.int64)
    t0 = time.time()
    a, b = dedup.clustered_edges(ids, emb, 0.95, cluster_size=2000, probe=2)
    out = {"n": n, "seconds": time.time() - t0, "pairs": len(_pairs(a, b))}
    t0 = time.time()
    if brute:
        truth = _pairs(*dedup.semantic_edges(ids, emb, 0.95))
        found = _pairs(a, b)
        out["recall_of"] = "all pairs"
    else:
        q = np.sort(np.random.default_rng(2).choice(n, size=min(queries, n), replace=False))
        sims = emb[q] @ emb.T
        i, j = np.nonzero(sims >= 0.95)
        keep = q[i] != j
        truth = _pairs(q[i[keep]], j[keep])
        sel = np.isin(a, q) | np.isin(b, q)
        found = _pairs(a[sel], b[sel])
        out["recall_of"] = f"pairs of {len(q)} sampled rows"
    out.update(brute_seconds=time.time() - t0, recall=len(found & truth) / max(len(truth), 1), truth=len(truth))
    return out


def sizes(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="100000,1000000")
    p.add_argument("--embeddings", default="100000,1000000")
    p.add_argument("--brute", type=int, default=100000, help="recall vs brute force up to this many embeddings")
    p.add_argument("--queries", type=int, default=2000, help="beyond --brute: recall over this many sampled rows")
    p.add_argument(
        "--old",
        default="10000,40000,160000",
        help="sizes for the old O(n*kept) loop (skipped once the last one predicts > 10 min)",
    )
    args = p.parse_args()
    rows = [decide_write(n) for n in sizes(args.rows)]
    sem = [semantic(n, n <= args.brute, args.queries) for n in sizes(args.embeddings)]
    old = []
    for n in sizes(args.old):
        if old and old[-1]["seconds"] * (n / old[-1]["n"]) ** 2 > 600:
            old.append({"n": n, "seconds": float("nan")})  # quadratic: would not finish in 10 minutes
            continue
        t0 = time.time()
        old_loop(planted(n), 0.95)
        old.append({"n": n, "seconds": time.time() - t0})
    load = os.getloadavg()[0]
    head = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, 1-min load average at the end {load:.1f} "
        "(shared with other jobs: absolute numbers are noisy). Command: `python -m benchmarks.curation_scale "
        f"--rows {args.rows} --embeddings {args.embeddings} --old {args.old}`."
    )
    what = (
        "Decide + write over synthetic scored shards of 1000 rows (demo profile + CLIP dedup at 0.97 on 32-d "
        "embeddings, output shards of 1000 images; "
        "local Ray, 2 CPUs; the driver process only):"
    )
    lines = [
        "## Curation at scale (`benchmarks/curation_scale.py`)",
        "",
        head,
        "",
        what,
        "",
        "| rows | decide (s) | write (s) | s per 1k rows | driver peak RSS after decide / after write (MiB) | "
        "kept | duplicate |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        per = (r["decide"] + r["write"]) / r["rows"] * 1000
        lines.append(
            f"| {r['rows']} | {r['decide']:.1f} | {r['write']:.1f} | {per:.2f} | "
            f"{r['rss_decide_mib']:.0f} / {r['rss_mib']:.0f} | "
            f"{r['kept']} | {r['dup']} |"
        )
    lines += [
        "",
        "Semantic dedup, 768-d, 10% planted near copies, cosine >= 0.95 (one process):",
        "",
        "| embeddings | clustered (k-means, probe 2) s | distinct pairs found | recall vs brute force | over | "
        "brute force s |",
        "| ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for s in sem:
        lines.append(
            f"| {s['n']} | {s['seconds']:.1f} | {s['pairs']} | {s['recall']:.4f} | {s['recall_of']} "
            f"({s['truth']} true pairs) | {s['brute_seconds']:.1f} |"
        )
    lines += ["", "| embeddings | old loop (each vs every kept) s |", "| ---: | ---: |"]
    lines += [
        f"| {o['n']} | {o['seconds']:.1f} |"
        if o["seconds"] == o["seconds"]
        else f"| {o['n']} | not run: > 10 min predicted (quadratic) |"
        for o in old
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
