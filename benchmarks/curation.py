"""Curation throughput and memory on this machine, against img2dataset alone on the same served images.

    python -m benchmarks.curation [--urls 200] [--scale 200,2000]

1. Real photos (Debian's wallpapers via ../shared/tools/real-images; many 4K) behind the loopback
   server, `--urls` URLs cycling over them: img2dataset alone (same process and thread count,
   originals kept) vs the whole curation stage (demo profile: tiny CLIP), images/s, seconds per step,
   peak RSS of the whole process tree (driver + Ray).
2. Peak RSS at each `--scale` URL count on small generated 1K images: it must stay flat.
Writes benchmarks/results/curation.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation.md"
REAL = ROOT / "benchmarks" / "data" / "real"
PROCESSES, THREADS = 1, 8  # the demo profile's download settings, used for both sides

I2D_SCRIPT = """
import sys
from img2dataset import download
if __name__ == "__main__":
    download(url_list=sys.argv[1], output_folder=sys.argv[2], input_format="parquet", url_col="url",
             output_format="webdataset", resize_mode="no", disable_all_reencoding=True, processes_count={p},
             thread_count={t}, number_sample_per_shard=16, timeout=5, retries=0, distributor="multiprocessing",
             user_agent_token="sigmaforge")
"""


def run_measured(argv: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS of the process tree in MiB, peak RSS of the top process in MiB)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_tree = peak_top = 0.0
    stop = threading.Event()

    def sample():
        nonlocal peak_tree, peak_top
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                procs = [p] + p.children(recursive=True)
                rss = [q.memory_info().rss for q in procs if q.is_running()]
                peak_tree = max(peak_tree, sum(rss) / 2**20)
                peak_top = max(peak_top, p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            stop.wait(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        sys.exit(f"benchmark step failed: {' '.join(argv[:3])} ...\n{err.decode()[-2000:]}")
    return time.time() - t0, peak_tree, peak_top


def url_list(path: Path, base: str, names: list[str], n: int) -> None:
    urls = [f"{base}/{names[i % len(names)]}?i={i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(n)]}), path)


def curate(urls: Path, out: Path, env: dict) -> tuple[float, float, float, dict]:
    wall, tree, top = run_measured([sys.executable, "curation/run.py", "--urls", str(urls), "--out", str(out),
                                    "--profile", "demo", "--set", f"curation.download.processes={PROCESSES}",
                                    "--set", f"curation.download.threads={THREADS}"], env)
    return wall, tree, top, json.loads((out / "stats.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=200)
    ap.add_argument("--scale", default="200,2000")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from demo import tiny_models
    from demo.images import encode, render
    from demo.serve import ImageServer

    tiny_models.build(ROOT / ".cache" / "tiny")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    if not (REAL / "images").is_dir():
        subprocess.run([str(ROOT.parent / "shared" / "tools" / "real-images"), str(REAL)], check=True)
    photos = sorted(p.name for p in (REAL / "images").iterdir())
    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    rows, scale_rows = [], []
    try:
        with ImageServer(REAL / "images") as srv:
            url_list(tmp / "real.parquet", srv.url, photos, args.urls)
            i2d = tmp / "i2d.py"
            i2d.write_text(I2D_SCRIPT.replace("{p}", str(PROCESSES)).replace("{t}", str(THREADS)))
            w_dl, tree_dl, _ = run_measured([sys.executable, str(i2d), str(tmp / "real.parquet"), str(tmp / "i2d")], env)
            w_cur, tree_cur, top_cur, stats = curate(tmp / "real.parquet", tmp / "cur", env)
        s = stats["seconds"]
        rows = [("img2dataset alone (download, originals kept)", w_dl, args.urls / w_dl, tree_dl),
                ("curation stage, end to end (incl. Ray start)", w_cur, args.urls / w_cur, tree_cur),
                ("  of which download + measure + embed (streaming)", s["download_score"],
                 args.urls / s["download_score"], None),
                ("  of which decide (thresholds + dedup)", s["decide"], None, None),
                ("  of which write shards + manifest", s["write"], None, None)]
        cpu = [("measure (decode, tier, quality, hashes), CPU s summed", s["measure_cpu"]),
               ("embed + aesthetic (tiny CLIP), CPU s summed", s["embed_cpu"]),
               ("img2dataset download, s summed over shards", stats["img2dataset"]["duration"])]

        small = tmp / "small"
        small.mkdir()
        for i in range(20):
            (small / f"{i:02d}.jpg").write_bytes(encode(render(100 + i, 1024, 1024), "JPEG"))
        with ImageServer(small) as srv:
            for n in [int(x) for x in args.scale.split(",")]:
                url_list(tmp / f"s{n}.parquet", srv.url, sorted(p.name for p in small.iterdir()), n)
                wall, tree, top, st = curate(tmp / f"s{n}.parquet", tmp / f"s{n}", env)
                scale_rows.append((n, wall, n / wall, top, tree, st["kept"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = ["## Curation", "",
             f"Machine: {platform.node()}, {os.cpu_count()} CPUs (shared with other jobs while measured), "
             f"load average {os.getloadavg()[0]:.1f}. Command: `python -m benchmarks.curation --urls {args.urls}`. "
             f"Both sides: {PROCESSES} download process, {THREADS} threads, loopback HTTP server.", "",
             f"{args.urls} URLs cycling over {len(photos)} real photos/wallpapers (Debian gnome/mate backgrounds; "
             "many 4096², JPEG/PNG/WebP); demo profile (tiny random CLIP for aesthetics).", "",
             "| run | seconds | images/s | peak RSS, process tree (MiB) |", "| --- | ---: | ---: | ---: |"]
    for name, sec, ips, rss in rows:
        lines.append(f"| {name} | {sec:.1f} | {'' if ips is None else f'{ips:.1f}'} | "
                     f"{'' if rss is None else f'{rss:.0f}'} |")
    lines += ["", f"Full stage / download only: **{w_cur / w_dl:.2f}x** end to end; "
              f"{s['download_score'] / w_dl:.2f}x for the streaming part (target 1.5x).", "",
              "| step (inside the streaming part) | seconds |", "| --- | ---: |"]
    lines += [f"| {n} | {v:.1f} |" for n, v in cpu]
    lines += ["", "Peak RSS against URL count (generated 1024² JPEGs, 20 distinct, the rest duplicates):", "",
              "| URLs | seconds | images/s | driver peak RSS (MiB) | process tree peak RSS (MiB) | kept |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {n} | {w:.1f} | {ips:.1f} | {top:.0f} | {tree:.0f} | {kept} |" for n, w, ips, top, tree, kept in scale_rows]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
