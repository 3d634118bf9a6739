"""Requests per recaption shard and per encoded shard on an S3 API (LIST, HEAD, GET, PUT, multipart), counted
by the server.

    python -m benchmarks.storage_requests [--shards 8] [--per-shard 16] [--shard-bytes 1000000] [--smoke]

Curated shards (synthetic JPEGs in curation's layout: KEY.jpg, KEY.json, KEY.txt) are put in a bucket of
moto's S3 server on loopback. Then, each as the README runs it (a subprocess with its own
local Ray), bucket -> bucket: `captioning/recaption --captioner original` (no model: the requests are what is
measured, and a captioner changes none of them), and `encoding/encode --tier 256` (tiny T5 and VAE, demo
profile) on those captions. Both talk to a counting endpoint onto the same server (a WSGI middleware around
moto's app: benchmarks/curation_tars_bucket.CountingS3), so every request of the driver and of every Ray
worker is counted. Classes: LIST (a GET with list-type/prefix), HEAD, GET (whole or ranged), PUT (one-shot
object), MPU (multipart: create + each part + complete), DELETE. A rerun of each stage on the finished output
(what a resume that has nothing left to do costs) is counted too. Prints a table; writes no results file
(benchmarks/RESULTS.md is the lead's).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.curation_tars_bucket import CountingS3

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("LIST", "HEAD", "GET", "PUT", "MPU", "DELETE")


def curated_tar(shard: int, n: int) -> bytes:
    """One curated shard: n JPEGs of 300-332 x 260-276 px (the 256 tier), KEY.json, KEY.txt (the alt text)."""
    import numpy as np
    from PIL import Image

    from shards import tar_writer

    buf = io.BytesIO()
    rng = np.random.default_rng(shard)
    with tar_writer.open_for_writing(buf) as tar:
        for i in range(n):
            key, (w, h) = f"{shard:05d}{i:04d}", (300 + 8 * (i % 5), 260 + 8 * (i % 3))
            img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((w, h))
            jpg = io.BytesIO()
            img.save(jpg, format="JPEG")
            tar_writer.add(tar, f"{key}.jpg", jpg.getvalue())
            tar_writer.add(tar, f"{key}.json", json.dumps({"key": key, "width": w, "height": h}).encode())
            tar_writer.add(tar, f"{key}.txt", f"a photo number {i} of shard {shard}".encode())
    return buf.getvalue()


def kind(method: str, query: str) -> str:
    """The request class of one S3 request."""
    if method == "GET":
        return "LIST" if "list-type" in query or "prefix=" in query else "GET"
    if method == "PUT":
        return "MPU" if "partNumber=" in query else "PUT"
    if method == "POST":
        return "DELETE" if query.startswith("delete") else "MPU"  # ?uploads (create), ?uploadId= (complete)
    if method == "DELETE":
        return "MPU" if "uploadId=" in query else "DELETE"  # an aborted upload is a multipart request too
    return method


def run(argv: list[str], env: dict, s3: CountingS3) -> tuple[Counter, float]:
    """One stage as a subprocess; its requests by class and its wall time."""
    s3.requests.clear()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{argv[0]} failed:\n{r.stderr[-3000:]}")
    return Counter(kind(m, q) for m, _, q in list(s3.requests)), wall


def row(name: str, counts: Counter, per: int, unit: str, wall: float) -> str:
    cells = [f"{counts.get(c, 0)} ({counts.get(c, 0) / per:.1f})" for c in CLASSES]
    return f"| {name} | {per} {unit} | {' | '.join(cells)} | {sum(counts.values()) / per:.1f} | {wall:.1f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8, help="curated shards")
    ap.add_argument("--per-shard", type=int, default=16, help="samples per curated shard")
    ap.add_argument("--shard-bytes", type=int, default=1_000_000, help="encode.shard_bytes (training tar size)")
    ap.add_argument("--smoke", action="store_true", help="2 shards of 3 samples")
    args = ap.parse_args()
    if args.smoke:
        args.shards, args.per_shard = 2, 3
    from demo import tiny_models

    tiny_models.build(ROOT / ".cache" / "tiny")
    creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(creds)
    s3 = CountingS3()
    env = {
        **os.environ,
        **creds,
        "AWS_ENDPOINT_URL": s3.url,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(ROOT),
    }
    os.environ["AWS_ENDPOINT_URL"] = s3.url
    lines: list[str] = []
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=s3.url, skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir("bench")
        for s in range(args.shards):
            fs.pipe_file(f"bench/cur/shards/{s:05d}.tar", curated_tar(s, args.per_shard))
        shards = f"s3://bench/cur/shards/{{00000..{args.shards - 1:05d}}}.tar"
        common = ["--profile", "demo", "--set", f"storage.s3.endpoint_url={s3.url}"]
        recap = ["captioning/recaption", "--shards", shards, "--out", "s3://bench/caps", "--captioner", "original"]
        enc = ["encoding/encode", "--images", shards, "--captions", "s3://bench/caps", "--out", "s3://bench/enc"]
        enc += ["--tier", "256", "--set", f"encode.shard_bytes={args.shard_bytes}"]
        got = {}
        got["recaption"] = run(recap + common, env, s3)
        got["recaption, rerun (all done)"] = run(recap + common, env, s3)
        got["encode"] = run(enc + common, env, s3)
        tars = len(fs.glob("bench/enc/shards/*/*.tar"))
        got["encode, rerun (all done)"] = run(enc + common, env, s3)
        index = json.loads(fs.cat_file("bench/enc/info.json"))
    finally:
        s3.stop()
    n = args.shards
    lines += [
        f"## Requests per shard on S3 (`python -m benchmarks.storage_requests --shards {n} --per-shard "
        f"{args.per_shard} --shard-bytes {args.shard_bytes}`)",
        "",
        f"{n} curated shards of {args.per_shard} samples; encode wrote {tars} training tars at tier "
        f"{index.get('tier')}. Counted at the server, every process of the run. Cells: total (per shard).",
        "",
        f"| run | per | {' | '.join(CLASSES)} | all per shard | wall (s) |",
        "| --- | ---: | " + " | ".join("---:" for _ in CLASSES) + " | ---: | ---: |",
    ]
    for name, (counts, wall) in got.items():
        lines.append(row(name, counts, n, "curated shards", wall))
        if name == "encode":
            lines.append(row("encode, per training tar", counts, max(tars, 1), "training tars", wall))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
