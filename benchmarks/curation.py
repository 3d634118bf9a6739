"""Curation throughput and memory on this machine, against img2dataset alone on the same served images.

    python -m benchmarks.curation [--urls 200] [--links none,100] [--scale 200,2000] [--rounds 1]

1. Real photos (Debian's wallpapers via tools/real-images; many 4K) behind the loopback
   server, `--urls` URLs cycling over them: img2dataset alone (same process and thread count,
   originals kept) vs the whole curation stage (demo profile: tiny CLIP), seconds per step, peak RSS
   of the whole process tree (driver + Ray); once per `--links` cap on the server's bandwidth (an
   uncapped loopback makes downloading nearly free, which no crawl sees).
   `--rounds` times each (the table shows the round with the median ratio and the spread of all);
   whether Ray printed its "will hang" warning.
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
PROCESSES, THREADS = 2, 8  # download processes (one per core here) and threads each, used for both sides

I2D_SCRIPT = """
import sys
from img2dataset import download
if __name__ == "__main__":
    download(url_list=sys.argv[1], output_folder=sys.argv[2], input_format="parquet", url_col="url",
             output_format="webdataset", resize_mode="no", disable_all_reencoding=True, processes_count={p},
             thread_count={t}, number_sample_per_shard=16, timeout=5, retries=0, distributor="multiprocessing",
             user_agent_token="sigmaforge")
"""


def run_measured(argv: list[str], env: dict | None = None, cwd: Path = ROOT) -> tuple[float, float, float, str]:
    """(wall seconds, peak RSS of the process tree in MiB, peak RSS of the top process in MiB, stderr)."""
    t0 = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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
    return time.time() - t0, peak_tree, peak_top, err.decode(errors="replace")


def real_photos() -> list[str]:
    """Names of the real photos in REAL/images, unpacked there once by tools/real-images."""
    if not (REAL / "images").is_dir() or not any((REAL / "images").iterdir()):
        subprocess.run([str(ROOT / "tools" / "real-images"), str(REAL)], check=True)
    return sorted(p.name for p in (REAL / "images").iterdir())


def url_list(path: Path, base: str, names: list[str], n: int) -> None:
    urls = [f"{base}/{names[i % len(names)]}?i={i}" for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"photo {i}" for i in range(n)]}), path)


def curate_argv(run_py: str | Path, urls: Path, out: Path) -> list[str]:
    """The curation command both benchmarks time: demo profile, PROCESSES x THREADS downloads."""
    sets = [f"curation.download.processes={PROCESSES}", f"curation.download.threads={THREADS}"]
    argv = [sys.executable, str(run_py), "--urls", str(urls), "--out", str(out), "--profile", "demo"]
    return argv + [a for s in sets for a in ("--set", s)]


def curate(urls: Path, out: Path, env: dict) -> tuple[float, float, float, dict]:
    wall, tree, top, err = run_measured(curate_argv("curation/run.py", urls, out), env)
    return wall, tree, top, {**json.loads((out / "stats.json").read_text()), "will_hang": "will hang" in err}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--urls", type=int, default=200)
    ap.add_argument("--scale", default="200,2000", help="URL counts for the memory table ('' to skip)")
    ap.add_argument(
        "--links", default="none,100", help="server link caps in Mbit/s for the comparison, 'none' = uncapped loopback"
    )
    ap.add_argument("--rounds", type=int, default=1, help="comparison rounds per link (median and spread)")
    args = ap.parse_args()
    from demo import tiny_models
    from demo.images import encode, render
    from demo.serve import ImageServer

    tiny_models.build(ROOT / ".cache" / "tiny")
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    photos = real_photos()
    tmp = Path(tempfile.mkdtemp(prefix="bench-curation-"))
    links = [None if x == "none" else float(x) for x in args.links.split(",") if x]
    runs, scale_rows = [], []
    try:
        i2d = tmp / "i2d.py"
        i2d.write_text(I2D_SCRIPT.replace("{p}", str(PROCESSES)).replace("{t}", str(THREADS)))
        for link in links:
            rounds = []
            with ImageServer(REAL / "images", link_mbps=link) as srv:
                name = f"{link or 0:g}"
                url_list(tmp / f"real-{name}.parquet", srv.url, photos, args.urls)
                for r in range(args.rounds):
                    w_dl, tree_dl, _, _ = run_measured(
                        [sys.executable, str(i2d), str(tmp / f"real-{name}.parquet"), str(tmp / f"i2d-{name}-{r}")], env
                    )
                    w_cur, tree_cur, _, stats = curate(tmp / f"real-{name}.parquet", tmp / f"cur-{name}-{r}", env)
                    rounds.append((link, w_dl, tree_dl, w_cur, tree_cur, stats))
            rounds.sort(key=lambda x: x[3] / x[1])
            ratios = [x[3] / x[1] for x in rounds]
            runs.append(
                rounds[len(rounds) // 2]
                + (min(ratios), max(ratios), len(rounds), any(x[5]["will_hang"] for x in rounds))
            )

        small = tmp / "small"
        small.mkdir()
        for i in range(20):
            (small / f"{i:02d}.jpg").write_bytes(encode(render(100 + i, 1024, 1024), "JPEG"))
        with ImageServer(small) as srv:
            for n in [int(x) for x in args.scale.split(",") if x]:
                url_list(tmp / f"s{n}.parquet", srv.url, sorted(p.name for p in small.iterdir()), n)
                wall, tree, top, st = curate(tmp / f"s{n}.parquet", tmp / f"s{n}", env)
                scale_rows.append((n, wall, n / wall, top, tree, st["kept"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = sum((REAL / "images" / photos[i % len(photos)]).stat().st_size for i in range(args.urls)) / 1e6
    lines = [
        "## Curation",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} after the "
        f"runs. Command: `python -m benchmarks.curation --urls {args.urls} --links {args.links} "
        f"--rounds {args.rounds}`. Both sides: "
        f"{PROCESSES} download processes x {THREADS} threads, the same loopback HTTP server.",
        "",
        f"{args.urls} URLs cycling over {len(photos)} real photos/wallpapers (Debian gnome/mate backgrounds; "
        f"many 4096²; JPEG/PNG/WebP; {mb:.0f} MB in all); demo profile (tiny random CLIP for aesthetics). "
        "Link: the server's cap on bytes/s for all connections together, as a crawling node's network "
        "link (none: loopback, where downloading costs next to nothing and decoding dominates).",
        "",
        "| link | img2dataset alone (s) | curation stage, end to end (s) | ratio (target 1.5x) | ratio over "
        "the rounds: min-max (rounds) | of which: "
        "download + measure + embed, streaming (s) | decide (s) | write shards + manifest (s) | the rest: "
        "start-up, input split, report.html (s) | peak RSS, process tree: img2dataset / curation (MiB) | "
        'Ray\'s "will hang" warning |',
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for link, w_dl, tree_dl, w_cur, tree_cur, stats, lo, hi, n, hang in runs:
        sec = stats["seconds"]
        rest = w_cur - sec["download_score"] - sec["decide"] - sec["write"]
        lines.append(
            f"| {'none' if link is None else f'{link:g} Mbit/s'} | {w_dl:.1f} | {w_cur:.1f} | "
            f"**{w_cur / w_dl:.2f}x** | {lo:.2f}-{hi:.2f} ({n}) | {sec['download_score']:.1f} | "
            f"{sec['decide']:.1f} | {sec['write']:.1f} | {rest:.1f} | {tree_dl:.0f} / {tree_cur:.0f} | "
            f"{'yes' if hang else 'no'} |"
        )
    cpus = os.cpu_count()
    lines += [""] + [
        f"- Link {'none' if link is None else f'{link:g} Mbit/s'}: decoding alone (measure CPU s / {cpus} CPUs) needs "
        f"{stats['seconds']['measure_cpu'] / cpus:.0f} s = {stats['seconds']['measure_cpu'] / cpus / w_dl:.2f}x of "
        "img2dataset alone, which stores the bytes without decoding them."
        for link, w_dl, _, _, _, stats, *_ in runs
    ]
    lines += [
        "",
        "| step, CPU seconds summed over workers | "
        + " | ".join("none" if r[0] is None else f"{r[0]:g} Mbit/s" for r in runs)
        + " |",
        "| --- |" + " ---: |" * len(runs),
    ]
    for label, get in (
        ("measure (decode, tier, quality, hashes)", lambda st: st["seconds"]["measure_cpu"]),
        ("embed + aesthetic (tiny CLIP)", lambda st: st["seconds"]["embed_cpu"]),
        ("img2dataset download inside the stage (s, summed over shards)", lambda st: st["img2dataset"]["duration"]),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{get(r[5]):.1f}" for r in runs) + " |")
    lines += [
        "",
        "Peak RSS against URL count (generated 1024² JPEGs, 20 distinct, the rest duplicates):",
        "",
        "| URLs | seconds | images/s | driver peak RSS (MiB) | process tree peak RSS (MiB) | kept |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {n} | {w:.1f} | {ips:.1f} | {top:.0f} | {tree:.0f} | {kept} |" for n, w, ips, top, tree, kept in scale_rows
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
