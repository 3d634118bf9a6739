"""What the crawler's address guard and caps cost, against the whole curation stage's time.

    python -m benchmarks.crawl [--urls 300] [--rounds 5]

`--urls` URLs cycling over the real photos of benchmarks/curation.py (tools/real-images) behind
the uncapped loopback server: the worst case for the ratio, since every byte costs next to nothing
there and the guard's per-request work is all that differs. Rounds alternate which side goes first:

- guard + caps on: one download shard through img2dataset exactly as curation runs it
  (`download.download_shard`, demo profile, per-host scheduler, robots.txt on);
- off: the same shard, same scheduler, with `guard.connect` replaced by a plain
  `socket.create_connection`, no deadline watchdog and an unbounded `read()` (what urllib did);
- the stage: `curation/run.py` end to end on the same URL list (demo profile), twice.

The cost is (median on - median off) / median stage. Writes benchmarks/results/crawl.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from benchmarks.rounds import spread

spread2 = lambda xs: spread(xs, "{:.2f}")  # seconds per download shard: two decimals

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "crawl.md"
THREADS = 8


@contextlib.contextmanager
def guard_and_caps_off():
    """Swap the guard and the caps out of curation.fetch in this process (the benchmark's 'off' side)."""
    from curation import fetch

    saved = fetch.guard.connect, fetch._watch, fetch._read

    class NoWatch:
        def __init__(self, deadline):
            self.expired = False

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    fetch.guard.connect = lambda host, port, timeout, allow=(): socket.create_connection((host, port), timeout)
    fetch._watch = NoWatch
    fetch._read = lambda r, limit, deadline: r.read()
    try:
        yield
    finally:
        fetch.guard.connect, fetch._watch, fetch._read = saved


def one_shard(urls: Path, work: Path, crawl) -> float:
    from curation import download, inputs

    shutil.rmtree(work, ignore_errors=True)
    n = pq.ParquetFile(urls).metadata.num_rows
    assert inputs.split_input(urls, work / "input", n) == 1
    t0 = time.perf_counter()
    download.download_shard(work / "input" / "00000.parquet", work / "dl", 0, crawl)
    seconds = time.perf_counter() - t0
    ok = sum(1 for r in download.iter_shard(work / "input" / "00000.parquet", work / "dl", 0) if not r["reason"])
    assert ok == n, f"only {ok} of {n} downloaded"
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-stage", action="store_true", help="skip the two end-to-end stage runs (quick check)")
    args = ap.parse_args()
    from benchmarks.curation import REAL, curate, real_photos, url_list
    from common import config
    from curation import download
    from demo import tiny_models
    from demo.serve import ImageServer

    tiny_models.build(ROOT / ".cache" / "tiny")
    photos = real_photos()
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    d = config.load(ROOT / "pipelines.yaml", "demo", [f"curation.download.threads={THREADS}"]).curation.download
    crawl = download.crawl_of(d)
    tmp = Path(tempfile.mkdtemp(prefix="bench-crawl-"))
    on, off, stage = [], [], []
    try:
        with ImageServer(REAL / "images") as srv:
            urls = tmp / "urls.parquet"
            url_list(urls, srv.url, photos, args.urls)
            one_shard(urls, tmp / "shard", crawl)  # warm-up, not timed: imports, robots.txt, page cache
            for r in range(args.rounds):
                for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                    if side == "on":
                        on.append(one_shard(urls, tmp / "shard", crawl))
                    else:
                        with guard_and_caps_off():
                            off.append(one_shard(urls, tmp / "shard", crawl))
                    print(f"round {r}: {side} {(on if side == 'on' else off)[-1]:.2f} s", flush=True)
            for i in range(0 if args.no_stage else 2):
                wall, _, _, _ = curate(urls, tmp / f"stage{i}", env)
                stage.append(wall)
                print(f"stage {i}: {wall:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if not stage:
        print(f"on {spread2(on)} s, off {spread2(off)} s")
        return
    cost = (statistics.median(on) - statistics.median(off)) / statistics.median(stage)
    mb = sum((REAL / "images" / photos[i % len(photos)]).stat().st_size for i in range(args.urls)) / 1e6
    lines = [
        "## Crawl: address guard and caps (`benchmarks/crawl.py`)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after the "
        f"runs. Command: `python -m benchmarks.crawl --urls {args.urls} --rounds {args.rounds}`. {args.urls} URLs "
        f"over {len(photos)} real photos ({mb:.0f} MB), uncapped loopback server (the worst case for the "
        f"ratio); one download shard, {THREADS} threads, demo profile; rounds alternate which side runs first.",
        "",
        "| | seconds, median (min-max) | rounds |",
        "| --- | ---: | ---: |",
        f"| download shard, guard + caps on | {spread2(on)} | {len(on)} |",
        f"| download shard, guard + caps off (plain connect, no deadline, unbounded read) | {spread2(off)} | "
        f"{len(off)} |",
        f"| curation stage end to end, same URLs (`curation/run.py --profile demo`) | {spread2(stage)} | "
        f"{len(stage)} |",
        "",
        f"Guard + caps cost: (median on - median off) / median stage = **{100 * cost:+.1f}%** of the stage's "
        "time (target <= 5%). Per request: "
        f"{1000 * (statistics.median(on) - statistics.median(off)) / args.urls * THREADS:+.2f} ms of a thread.",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
