"""Curation with `--out` in a bucket against `--out` on local disk, and what the bucket's requests cost.

    python -m benchmarks.curation_buckets [--urls 1000] [--rounds 3] [--photos real|generated]

The same loopback URL list as benchmarks/curation.py (`--urls` URLs cycling over Debian's real
photos, unpacked once by tools/real-images; `--photos generated`: 20 generated 1024² JPEGs, for a
quick smoke) curated end to end (demo profile, 2 download processes x 8 threads, a local Ray per run)
into a local folder and into `s3://` on moto's S3 server on loopback, the two interleaved round by
round (the order alternating), each into a fresh folder or bucket. The ratio bucket / disk is given
per round, median and spread.

The S3 server runs in this process behind a WSGI middleware that counts every request it answers,
whoever sends it (driver, Ray workers, img2dataset's writers): LIST, HEAD, GET, PUT, COPY, POST
(multipart create and complete), multipart parts, DELETE. The server shares the machine's CPUs with
the run: its CPU seconds (this process's, which does nothing else meanwhile) are given beside the
difference in wall time. From the counts, the request cost per million input URLs at S3 Standard's
request prices (us-east-1, as published on 2026-12-07: PUT, COPY, POST, LIST $0.005 per 1,000; GET and
all other requests $0.0004 per 1,000; DELETE free) and the storage the run leaves ($0.023 per GB-month,
first 50 TB). Writes benchmarks/results/curation_buckets.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs

import psutil

from benchmarks.curation import ROOT, curate_argv, real_photos, run_measured, url_list

RESULTS = ROOT / "benchmarks" / "results" / "curation_buckets.md"
KINDS = ("LIST", "HEAD", "GET", "PUT", "COPY", "POST", "PART", "DELETE")
PRICE = {"LIST": 0.005, "PUT": 0.005, "COPY": 0.005, "POST": 0.005, "PART": 0.005, "HEAD": 0.0004, "GET": 0.0004}
PRICED_ON = "2026-12-07"  # S3 Standard, us-east-1 (per 1,000 requests)
STORAGE_GB_MONTH = 0.023


def kind(environ: dict) -> str:
    """The S3 request class of one HTTP request (path-style addressing, as s3fs uses on an endpoint)."""
    method = environ["REQUEST_METHOD"]
    query = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    key = environ.get("PATH_INFO", "/").lstrip("/").partition("/")[2]
    if method == "GET":
        return "LIST" if not key or "uploads" in query else "GET"
    if method == "PUT":
        if "partNumber" in query:
            return "PART"
        return "COPY" if "HTTP_X_AMZ_COPY_SOURCE" in environ else "PUT"
    if method == "POST":
        return "DELETE" if "delete" in query else "POST"  # DeleteObjects is a DELETE for billing
    return method  # HEAD, DELETE


class Counting:
    """WSGI middleware: counts requests by kind (thread-safe), then hands them to moto."""

    def __init__(self, app):
        self.app, self.counts, self.lock = app, Counter(), threading.Lock()
        self.by_path: Counter = Counter()  # (kind, path with digits as N): which objects the requests are for

    def __call__(self, environ, start_response):
        k = kind(environ)
        with self.lock:
            self.counts[k] += 1
            self.by_path[k, re.sub(r"\d+", "N", environ.get("PATH_INFO", ""))] += 1
        return self.app(environ, start_response)

    def take(self) -> tuple[Counter, Counter]:
        """The counts by kind and by (kind, path) since the last take."""
        with self.lock:
            out, self.counts = self.counts, Counter()
            paths, self.by_path = self.by_path, Counter()
        return out, paths


def start_server() -> tuple[str, Counting, object]:
    """moto's S3 app on 127.0.0.1 (a free port) behind `Counting`; returns (endpoint, counter, server)."""
    import logging

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request

    counting = Counting(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", counting, server


def generated_photos(folder: Path) -> list[str]:
    from demo.images import encode, render

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (folder / f"{i:02d}.jpg").write_bytes(encode(render(100 + i, 1024, 1024), "JPEG"))
    return sorted(p.name for p in folder.iterdir())


def bucket_bytes(fs, bucket: str) -> int:
    return sum(int(i["size"]) for i in fs.find(bucket, detail=True).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each one local and one bucket run")
    ap.add_argument("--photos", choices=("real", "generated"), default="real")
    args = ap.parse_args()
    from demo import tiny_models
    from demo.serve import ImageServer

    tiny_models.build(ROOT / ".cache" / "tiny")
    endpoint, counting, server = start_server()
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update({k: env[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")})
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    me = psutil.Process()
    tmp = Path(tempfile.mkdtemp(prefix="bench-buckets-"))
    rounds = []
    try:
        if args.photos == "real":
            folder, photos = ROOT / "benchmarks" / "data" / "real" / "images", real_photos()
        else:
            folder = tmp / "photos"
            photos = generated_photos(folder)
        with ImageServer(folder) as srv:
            url_list(tmp / "urls.parquet", srv.url, photos, args.urls)
            for r in range(args.rounds):
                row = {}
                for side in ("local", "bucket") if r % 2 == 0 else ("bucket", "local"):
                    if side == "local":
                        out = tmp / f"local-{r}"
                    else:
                        fs.mkdir(f"bench-{r}")
                        out = f"s3://bench-{r}/cur"
                    counting.take()
                    cpu0 = sum(me.cpu_times()[:2])
                    wall, _, _, _ = run_measured(curate_argv("curation/run.py", tmp / "urls.parquet", out), env)
                    server_cpu = sum(me.cpu_times()[:2]) - cpu0
                    counts, paths = counting.take()  # the run's requests only, before this script reads the results
                    if side == "local":
                        stats = json.loads((out / "stats.json").read_text())
                        row["local"] = wall
                        shutil.rmtree(out, ignore_errors=True)
                    else:
                        stats = json.loads(fs.cat_file(f"bench-{r}/cur/stats.json"))
                        row.update(bucket=wall, server_cpu=server_cpu, counts=counts, paths=paths)
                        row.update(stats=stats, stored=bucket_bytes(fs, f"bench-{r}"))
                        fs.rm(f"bench-{r}", recursive=True)
                rounds.append(row)
    finally:
        server.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    write(args, rounds)


def write(args, rounds: list[dict]) -> None:
    ratios = [r["bucket"] / r["local"] for r in rounds]
    mid = sorted(rounds, key=lambda r: r["bucket"] / r["local"])[len(rounds) // 2]
    st = mid["stats"]
    shards, urls = max(st["shards"], 1), st["urls"]
    counts = mid["counts"]
    per_million = {k: counts[k] / urls * 1e6 for k in KINDS}
    cost = {k: per_million[k] / 1000 * PRICE.get(k, 0.0) for k in KINDS}
    stored_gb = mid["stored"] / urls * 1e6 / 1e9
    lines = [
        "## Curation with --out in a bucket",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after the runs. "
        f"Command: `python -m benchmarks.curation_buckets --urls {args.urls} --rounds {args.rounds} "
        f"--photos {args.photos}`. The same URL list, demo profile, 2 download processes x 8 threads, a local "
        "Ray per run; `--out` a local folder or `s3://` on moto's S3 server on loopback (in the benchmark's "
        "process, sharing the CPUs), the two interleaved, the order alternating by round.",
        "",
        "| round | local disk (s) | bucket (s) | ratio (target 1.15x) | S3 server CPU during the bucket run (s) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {i} | {r['local']:.1f} | {r['bucket']:.1f} | {r['bucket'] / r['local']:.2f}x | {r['server_cpu']:.1f} |"
        for i, r in enumerate(rounds)
    ]
    lines += [
        "",
        f"Ratio: median **{statistics.median(ratios):.2f}x**, min-max {min(ratios):.2f}-{max(ratios):.2f} "
        f"({len(rounds)} rounds).",
        "",
        f"Requests of the median round, counted by the server ({urls} URLs, {st['kept']} kept in "
        f"{st['shards']} curated shards; prices: S3 Standard, us-east-1, {PRICED_ON}):",
        "",
        "| request | in the run | per curated shard | per million URLs | $ per million URLs |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {k} | {counts[k]} | {counts[k] / shards:.1f} | {per_million[k]:,.0f} | {cost[k]:.2f} |" for k in KINDS
    ]
    lines += [
        f"| all | {sum(counts.values())} | {sum(counts.values()) / shards:.1f} | "
        f"{sum(per_million.values()):,.0f} | **{sum(cost.values()):.2f}** |",
        "",
        f"Left in the bucket: {mid['stored'] / 1e6:.1f} MB ({stored_gb:.1f} GB per million URLs: "
        f"${stored_gb * STORAGE_GB_MONTH:.2f} per month at ${STORAGE_GB_MONTH}/GB-month). PART: multipart "
        "upload parts (priced as PUT); POST: multipart create and complete; DELETE (free): the download "
        "tars freed after the write step, a dedup step's leftovers.",
        "",
        "The median round's most frequent requests by object (digits shown as N):",
        "",
        "| request | object | count |",
        "| --- | --- | ---: |",
        *(f"| {k} | `{path}` | {n} |" for (k, path), n in mid["paths"].most_common(12)),
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
