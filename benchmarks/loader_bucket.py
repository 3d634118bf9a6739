"""The training loader reading an ENCDIR from a bucket (through the node's cache, shards/cache.py) vs the same
folder on disk, side by side, with the bytes and requests the bucket side cost.

    python -m benchmarks.loader_bucket [--samples 512] [--side 64] [--tokens 120] [--t5-dim 4096]
                                       [--shard-mb 32] [--batches 96] [--workers 2] [--rounds 3] [--smoke]

A version 2 ENCDIR (latents [4, side, side] fp16 mean + std, one caption set of `--tokens` x `--t5-dim`
fp16 features per sample, in tars of about `--shard-mb` MiB) is written once,
to a local folder and to a bucket of moto's S3 server on loopback (in this process: its CPU time is
reported, as it shares the machine with the run). Each round measures, in this order:

- disk: the loader on the local folder (read in place, no cache);
- cold: the bucket with an empty cache that holds the data set;
- warm: the bucket again, the cache as the cold run left it;
- small: the bucket with an empty cache of a third of the data set (evictions, objects fetched again).

Each side takes `--batches` batches of 8 from `make_loader` (resampled draws, `--workers` workers, the
same seed: the same samples on every side), timed from `iter()` to the last batch (worker start-up
included on every side). The bucket sides talk to a counting endpoint onto the same server
(benchmarks/curation_tars_bucket.py `CountingS3`), so every request of the loader and its workers is
counted; requests made while the loader is built (info.json, the shards' listing, the row files) are
counted apart from those of the iteration. Bytes fetched: the bytes of each GET of a tar or caption-set
file during the iteration (its Range, else the whole object; the Range headers are recorded by a
wrapper around that endpoint's WSGI app), divided by the bytes of the samples consumed (the data set's
bytes per sample x samples). Writes
benchmarks/results/loader_bucket.md (not with --smoke).
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from benchmarks.curation_tars_bucket import BENCH_CREDENTIALS, CountingS3
from benchmarks.rounds import spread

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "loader_bucket.md"
BATCH = 8


def write_encdir(folder: Path, samples: int, side: int, tokens: int, dim: int, shard_bytes: int) -> None:
    """A version 2 ENCDIR of one square bucket (pixel side 8 x `side`), written with the real writer."""
    from safetensors.torch import save_file

    from shards import encoded

    fp, hw = "b" * 16, (side * 8, side * 8)
    gen = torch.Generator().manual_seed(0)
    writer = encoded.BucketWriter(folder, hw, fp, shard_bytes, sets=("recaption",))
    for i in range(samples):
        key = f"{i:09d}"
        mean = torch.randn(4, side, side, generator=gen)
        meta = {"key": key, "bucket": "1.00", "bucket_hw": list(hw), "size": list(hw), "resized": list(hw)}
        meta |= {"crop_box": [0, 0, hw[1], hw[0]], "source": "00000.tar", "fingerprint": fp}
        meta["format_version"] = encoded.FORMAT_VERSION
        row = dict(key=key, status="kept", reason="", bucket="1.00", bucket_h=hw[0], bucket_w=hw[1])
        row |= dict(width=hw[1], height=hw[0], source="00000.tar", fingerprint=fp)
        feats = torch.randn(tokens, dim, generator=gen)
        sets = {"recaption": (f"caption {i}", feats, 30.0)}
        writer.write(meta, None, encoded.pack_vae(mean, mean.abs() * 0.1, 0.13025), row, sets)
    writer.close()
    save_file({"y_embedding": torch.zeros(300, dim)}, str(folder / "null_caption.safetensors"))
    info = dict(fingerprint=fp, tier="1k", table="1k", max_length=300, t5_dim=dim, scaling_factor=0.13025)
    info |= dict(latent_channels=4, null_caption="null_caption.safetensors")
    info["caption_sets"] = {"recaption": {"from": "benchmark", "stored": "side"}}
    encoded.write_info(folder, info)


def run_loader(where, batches: int, workers: int, cache, s3: CountingS3 | None = None) -> dict:
    """Build the loader, then take `batches` batches; with `s3`, the requests of the build are returned
    and the server's record cleared before the iteration."""
    from shards import loader

    t0 = time.perf_counter()
    dl = loader.make_loader(
        where,
        batch_size=BATCH,
        num_workers=workers,
        seed=0,
        shuffle_buffer=32,
        rule=loader.caption_rule({"recaption": 1.0}),
        cache=cache,
        read_ahead=2,
    )
    built = time.perf_counter()
    build_requests = Counter(_kind(m, q) for m, _, q in s3.requests) if s3 is not None else Counter()
    if s3 is not None:
        s3.requests.clear()
        _RANGES.clear()
    keys = []
    it = iter(dl)
    t1 = time.perf_counter()
    for b in itertools.islice(it, batches):
        keys += b["keys"]
    wall = time.perf_counter() - t1
    del it
    return {"wall": wall, "build": built - t0, "samples": len(keys), "keys": keys, "build_requests": build_requests}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--side", type=int, default=64, help="latent side (64: a 512 px bucket)")
    ap.add_argument("--tokens", type=int, default=120, help="T5 tokens per caption")
    ap.add_argument("--t5-dim", type=int, default=4096)
    ap.add_argument("--shard-mb", type=float, default=32.0)
    ap.add_argument("--batches", type=int, default=96, help=f"batches of {BATCH} per side")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a tiny data set, 1 round; writes no results file")
    args = ap.parse_args()
    if args.smoke:
        args.samples, args.side, args.tokens, args.t5_dim, args.shard_mb = 48, 8, 16, 64, 0.05
        args.batches, args.rounds = 12, 1
    os.environ.update(BENCH_CREDENTIALS)
    s3 = CountingS3()
    ranges = record_ranges(s3)
    os.environ["AWS_ENDPOINT_URL"] = s3.url
    tmp = Path(tempfile.mkdtemp(prefix="bench-loader-bucket-"))
    sides: dict[str, list[dict]] = {"disk": [], "cold": [], "warm": [], "small": []}
    server_cpu: list[float] = []
    try:
        import s3fs

        from shards import cache as cache_mod
        from shards import storage

        local = tmp / "enc"
        write_encdir(local, args.samples, args.side, args.tokens, args.t5_dim, int(args.shard_mb * 2**20))
        fs = s3fs.S3FileSystem(endpoint_url=s3.url, skip_instance_cache=True)
        fs.mkdir("bench")
        fs.put(str(local), "bench/enc", recursive=True)
        remote = storage.resolve("s3://bench/enc")
        objects = {
            "/bench/enc/" + p.relative_to(local).as_posix(): p.stat().st_size
            for p in local.rglob("*")
            if p.is_file() and (p.suffix == ".tar" or ".set-" in p.name)
        }
        data_bytes = sum(objects.values())
        n_tars = sum(1 for k in objects if k.endswith(".tar"))
        print(f"data set: {args.samples} samples, {n_tars} tars, {data_bytes / 2**20:.1f} MiB of shards", flush=True)
        for r in range(args.rounds):
            sides["disk"].append(run_loader(local, args.batches, args.workers, None))
            for name in ("cold", "warm", "small"):
                folder = tmp / ("cache" if name != "small" else "cache-small")
                if name != "warm":
                    shutil.rmtree(folder, ignore_errors=True)
                limit = data_bytes * 2 if name != "small" else data_bytes // 3
                s3.requests.clear()
                cpu = time.process_time()
                got = run_loader(remote, args.batches, args.workers, cache_mod.ShardCache(folder, limit), s3)
                server_cpu.append(time.process_time() - cpu)
                gets = [p for m, p, q in s3.requests if m == "GET" and p in objects]
                got["fetched"] = sum(_length(r) or objects[p] for p, r in ranges if p in objects)
                got["tar_gets"] = sum(1 for p in gets if p.endswith(".tar"))
                got["requests"] = Counter(_kind(m, q) for m, _, q in s3.requests)
                got["cache_bytes"] = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name[0] != ".")
                got["limit"] = limit
                sides[name].append(got)
            line = ", ".join(f"{k} {v[-1]['samples'] / v[-1]['wall']:.0f}/s" for k, v in sides.items())
            print(f"round {r}: samples/s {line}", flush=True)
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    same = all(x["keys"] == sides["disk"][0]["keys"] for runs in sides.values() for x in runs)
    per_sample = data_bytes / args.samples
    disk_rate = statistics.median([x["samples"] / x["wall"] for x in sides["disk"]])
    load = os.getloadavg()
    lines = [
        "## Training loader: ENCDIR in a bucket vs on disk (`benchmarks/loader_bucket.py`)",
        "",
        f"Machine: {platform.node()}, {os.cpu_count()} CPUs (load average {load[0]:.1f} / {load[2]:.1f} over "
        f"1 / 15 min after the runs). Command: `python -m benchmarks.loader_bucket --samples {args.samples} "
        f"--side {args.side} --tokens {args.tokens} --t5-dim {args.t5_dim} --shard-mb {args.shard_mb} "
        f"--batches {args.batches} --workers {args.workers} --rounds {args.rounds}`. {n_tars} tars, "
        f"{data_bytes / 2**20:.1f} MiB of shards ({per_sample / 1024:.0f} KiB a sample); {args.batches} batches of "
        f"{BATCH} per side (resampled draws); moto's S3 server in the benchmark's process. Median (min-max):",
        "",
        "| side | samples/s | vs disk | build (s) | bytes fetched / bytes consumed | requests in the run "
        "(GET / HEAD / LIST) | requests per tar fetched | cache at the end (MiB, limit) |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, runs in sides.items():
        rates = [x["samples"] / x["wall"] for x in runs]
        row = f"| {name} | {spread(rates, '{:.0f}')} | {statistics.median(rates) / disk_rate:.2f}x | "
        row += spread([x["build"] for x in runs], "{:.2f}") + " | "
        if name == "disk":
            lines.append(row + "- | - | - | - |")
            continue
        ratio = [x["fetched"] / (x["samples"] * per_sample) for x in runs]
        req = runs[-1]["requests"]
        per_tar = sum(req.values()) / max(1, runs[-1]["tar_gets"])
        lines.append(
            row + f"{spread(ratio, '{:.2f}')} | {req['GET']} / {req['HEAD']} / {req['LIST']} | "
            f"{per_tar:.1f} | {runs[-1]['cache_bytes'] / 2**20:.1f} ({runs[-1]['limit'] / 2**20:.1f}) |"
        )
    built = sides["cold"][-1]["build_requests"]
    lines += [
        "",
        f"- Building a loader on the bucket (info.json, the shards' listing, each tar's row file and set files' "
        f"columns): GET {built['GET']}, HEAD {built['HEAD']}, LIST {built['LIST']} (last round).",
        f"- The S3 server used {statistics.median(server_cpu):.1f} s of CPU per bucket side on the same machine.",
        f"- Same samples in the same order on every side and round: **{'yes' if same else 'NO'}**.",
    ]
    print("\n".join(lines))
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines) + "\n")
    if not same:
        sys.exit("the sides read different samples")


_RANGES: list[tuple[str, str]] = []  # (path, Range header) of each GET the counting endpoint served


def record_ranges(s3: CountingS3) -> list[tuple[str, str]]:
    """Wrap the counting endpoint's WSGI app so that each GET's Range header is recorded in _RANGES too."""
    inner = s3._server.app

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            _RANGES.append((environ.get("PATH_INFO", ""), environ.get("HTTP_RANGE", "")))
        return inner(environ, start_response)

    s3._server.app = app
    return _RANGES


def _length(header: str) -> int:
    """The bytes a `bytes=a-b` Range asks for (0: none)."""
    if not header.startswith("bytes="):
        return 0
    a, _, b = header[6:].partition("-")
    return int(b) - int(a) + 1 if a and b else 0


def _kind(method: str, query: str) -> str:
    return "LIST" if method == "GET" and "list-type" in query else method


if __name__ == "__main__":
    main()
