"""img2dataset-style tars curated in place from a bucket vs the same tars on disk, side by side, with the
requests each bucket tar cost.

    python -m benchmarks.curation_tars_bucket [--photos 46] [--per-tar 16] [--rounds 3] [--smoke]

The tars (KEY.jpg/.png/.webp + KEY.txt + KEY.json, as img2dataset writes them) are made once from the
real photos (tools/real-images) and put both in a local folder and in a bucket of moto's S3 server on
loopback (in this process: its CPU time is measured and reported, since it shares the machine with the
run). Rounds alternate disk / bucket so a change in the machine's load hits both sides alike; each
round starts from an empty local --out (the output side on a bucket is benchmarks/curation_buckets.py's).
The bucket side talks to a counting endpoint onto the same server, so every request of the run, its Ray
workers' included, is counted per tar: GET, HEAD, LIST. Both sides must keep the same images. Writes
benchmarks/results/curation_tars_bucket.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.curation import REAL, real_photos, run_measured
from benchmarks.rounds import spread

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "curation_tars_bucket.md"
SETTINGS = ["--profile", "demo", "--set", "curation.download.processes=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# moto accepts any credentials; the benchmarks set these so that no user's real ones are picked up
BENCH_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


class CountingS3:
    """moto's S3 server on loopback, plus a second endpoint onto the same state that counts each request
    (method, path, query): the run is pointed at the second one (storage.s3.endpoint_url)."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str]] = []

        def counted(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ["QUERY_STRING"]))
            return app(environ, start_response)

        self._server = make_server("127.0.0.1", _port(), counted, True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()


def i2d_tar(photos: list[str], first: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i, name in enumerate(photos):
            key = f"{first + i:09d}"
            meta = {"url": f"http://photos.example/{name}?i={first + i}", "key": key, "status": "success"}
            for member, data in (
                (f"{key}.{name.rsplit('.', 1)[1]}", (REAL / "images" / name).read_bytes()),
                (f"{key}.txt", f"photo {name}".encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def curate(spec: str, out: Path, env: dict, extra: list[str]) -> dict:
    wall, tree, _, _ = run_measured(
        [sys.executable, "curation/run.py", "--images", spec, "--out", str(out), *SETTINGS, *extra], env
    )
    stats = json.loads((out / "stats.json").read_text())
    import pandas as pd

    m = pd.read_parquet(out / "manifest.parquet", columns=["status", "sha256"])
    return {
        "wall": wall,
        "tree": tree,
        **stats["seconds"],
        "kept": set(m.loc[m.status == "kept", "sha256"]),
        "items": len(m),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=46, help="how many of the real photos (sorted by name)")
    ap.add_argument("--per-tar", type=int, default=16, help="samples per tar")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="4 photos, 2 per tar, 1 round; writes no results file")
    args = ap.parse_args()
    if args.smoke:
        args.photos, args.per_tar, args.rounds = 4, 2, 1
    from demo import tiny_models

    tiny_models.build(ROOT / ".cache" / "tiny")
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    photos = real_photos()[: args.photos]
    groups = [photos[i : i + args.per_tar] for i in range(0, len(photos), args.per_tar)]
    s3 = CountingS3()
    env["AWS_ENDPOINT_URL"] = s3.url
    tmp = Path(tempfile.mkdtemp(prefix="bench-tars-bucket-"))
    sides: dict[str, list[dict]] = {"disk": [], "bucket": []}
    server_cpu: list[float] = []
    per_tar: Counter[str] = Counter()
    try:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=s3.url, skip_instance_cache=True)
        fs.mkdir("bench")
        (tmp / "tars").mkdir()
        first = 0
        for i, names in enumerate(groups):
            data = i2d_tar(names, first)
            (tmp / "tars" / f"{i:05d}.tar").write_bytes(data)
            fs.pipe_file(f"bench/tars/{i:05d}.tar", data)
            first += len(names)
        spec = f"s3://bench/tars/{{00000..{len(groups) - 1:05d}}}.tar"
        endpoint = ["--set", f"storage.s3.endpoint_url={s3.url}"]
        for r in range(args.rounds):
            sides["disk"].append(curate(str(tmp / "tars"), tmp / f"disk-{r}", env, []))
            s3.requests.clear()
            cpu = time.process_time()  # this process serves the bucket (moto): its CPU is the server's
            sides["bucket"].append(curate(spec, tmp / f"bucket-{r}", env, endpoint))
            server_cpu.append(time.process_time() - cpu)
            per_tar = Counter(
                (m if not q.startswith("list-type") else "LIST")
                for m, p, q in s3.requests
                if p.startswith("/bench/tars/") or q.startswith("list-type")
            )
            print(
                f"round {r}: disk {sides['disk'][-1]['wall']:.1f} s, bucket {sides['bucket'][-1]['wall']:.1f} s",
                flush=True,
            )
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    same = all(s["kept"] == sides["disk"][0]["kept"] for side in sides.values() for s in side)
    disk = statistics.median([r["wall"] for r in sides["disk"]])
    bucket = statistics.median([r["wall"] for r in sides["bucket"]])
    load = os.getloadavg()
    lines = [
        "## img2dataset tars curated in place: bucket vs disk (`benchmarks/curation_tars_bucket.py`)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs (load average {load[0]:.1f} / {load[2]:.1f} over "
        f"1 / 15 min after the runs). Command: `python -m benchmarks.curation_tars_bucket --photos {args.photos} "
        f"--per-tar {args.per_tar} --rounds {args.rounds}`. {len(photos)} real photos in {len(groups)} tars; "
        "demo profile; local --out. Rounds alternate the sides; median (min-max) seconds:",
        "",
        "| input | rounds | end to end (s) | split (s) | read + measure + embed (s) | decide (s) | write (s) | "
        "peak RSS, process tree (MiB) | items | kept |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in sides.items():
        lines.append(
            f"| {name} | {len(runs)} | {spread([r['wall'] for r in runs])} | {spread([r['split'] for r in runs])} | "
            f"{spread([r['download_score'] for r in runs])} | {spread([r['decide'] for r in runs])} | "
            f"{spread([r['write'] for r in runs])} | {statistics.median([r['tree'] for r in runs]):.0f} | "
            f"{runs[0]['items']} | {len(runs[0]['kept'])} |"
        )
    lines += [
        "",
        f"- Bucket / disk: **{bucket / disk:.2f}x** (medians); the S3 server (moto, in the benchmark's process) "
        f"used {statistics.median(server_cpu):.1f} s of CPU per bucket round on the same machine.",
        "- Requests per tar (last bucket round, all processes): "
        + ", ".join(f"{k} {v / len(groups):.1f}" for k, v in sorted(per_tar.items()))
        + f" ({args.per_tar} samples per tar; LIST: the run's listings divided by the tars).",
        f"- Same images kept on both sides in every round (sha256 sets): **{'yes' if same else 'NO'}**.",
    ]
    print("\n".join(lines))
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines) + "\n")
    if not same:
        sys.exit("the two sides kept different images")


if __name__ == "__main__":
    main()
