"""The curation stage as one streaming Ray Data flow, resumable per shard.

    URL list -> input shards -> download (img2dataset; I/O-bound Ray tasks, `download.processes` at once)
             -> measure (decode once: size, tier, quality, hashes; CPU-bound Ray tasks, one per core)
             -> [CLIP embedding + aesthetic (+ safety)] Ray actors (the score thresholds are decided there,
                and only there) -> scored/NNNNN.parquet when a shard is complete (driver: no images)
             -> curation/dedup_job.py: dedup over the whole run (+ earlier runs), plain Ray tasks over files
             -> curation/outputs.py: manifest parts, shards/NNNNN.tar, manifest.parquet (Ray tasks)

Layout of DIR, a local folder or a bucket prefix (each file written once, atomically, and found by its
exact name; what exists is what is done):
    _work/input/NNNNN.parquet     the URL list cut into download shards, keyed, carried columns kept
    _work/where/NNNNN.parquet     images on disk (--images): where each item's bytes lie (curation/sources.py)
    downloads/NNNNN_stats.json    img2dataset's per-shard stats (+ .parquet; the .tar goes once its outputs exist)
    _work/scored/NNNNN.parquet    one row per URL of the shard: reason so far, size, tier, scores, hashes
    _work/dedup/                  edges per dedup kind, then dups.parquet (id, dup_of)
    _work/manifest/, _work/members/  per download shard: manifest rows, kept members
    shards/NNNNN.tar              kept images; dedup_index/ (for --dedup-against); manifest.parquet, stats.json last
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from common import progress, ray_start
from common.config import Config, CurationConfig
from common.gather import ShardGather
from curation import dedup, dedup_job, download, inputs, metadata, outputs, placement, quality
from shards import atomic, buckets, curated, fingerprint, reasons, storage
from shards.format import MANIFEST
from shards.storage import Loc

SCORED_COLUMNS = [
    "key",
    "url",
    "reason",
    "width",
    "height",
    "tier",
    "ext",
    "sharpness",
    "contrast",
    "brightness",
    "sha256",
    "phash",
    "aesthetic",
    "nsfw",
    "watermark",
    "src",
    "offset",
    "size",
    "embedding",
    "t_measure",
    "t_embed",
]
TIER_RANK = {t: i for i, t in enumerate(buckets.CURATION_TIERS)}
ROWS_PER_BLOCK = 32  # rows a download task hands on at a time: a bucket tar's rows carry their images (MBs)
MEASURE_BATCH = 4  # rows per measuring task: a few seconds of decoding for 4K photos
# Per measuring task (Ray's logical memory, also what its issue detector checks: it advises more when
# 1.25 x a task's peak USS exceeds it). Measured on the demo data: a worker peaks at 450 MiB, ~420 of
# it before any decode, as the same Ray workers run download tasks and img2dataset's resizer imports
# albumentations -> torch, cv2, scipy (~390 MiB); a JPEG decodes DCT-scaled (+7 MiB for 64 MP), a
# 64 MP PNG (the bomb guard's limit) in full (+240 MiB). 1.25 x (450 + 240) = 862 MiB -> 896.
MEASURE_MEMORY = 896 * 2**20


# ---------------------------------------------------------------------------------------------
# Per-shard: download + measure (a Ray task), embedding + scores (Ray actors)
# ---------------------------------------------------------------------------------------------


def measure(row: dict, cur: CurationConfig, options: Any = None) -> dict:
    """Decode-safe size, tier, quality and hashes of one downloaded row; sets `reason` when rejected.
    `image` becomes the small JPEG the models read (empty once the row is decided). `options`: the
    `storage` config section the row's `src` is read with."""
    t0 = time.perf_counter()
    out = {
        "width": 0,
        "height": 0,
        "tier": "",
        "ext": "",
        "sharpness": np.nan,
        "contrast": np.nan,
        "brightness": np.nan,
        "sha256": "",
        "phash": "",
    }
    data = row.pop("data", None)  # a bucket tar's image, read in its shard's one pass (curation/sources.py)
    row["image"] = b""
    if not row["reason"] and (problem := _unreadable(row["src"])):
        row["reason"] = problem  # an input file on disk changed since the split: a row, the run goes on
    if not row["reason"]:
        if data is None:
            data = curated.read_member(row["src"], row["offset"], row["size"], options)
        info = metadata.inspect(
            data, cur.max_pixels, lambda h, w: size_verdict(h, w, cur.min_tier), cur.measure_seconds
        )
        out.update(width=info.width, height=info.height, ext=info.ext or "")
        if info.width and info.height:
            out["tier"] = buckets.tier_of(info.height, info.width) or ""
        reason = info.reason
        if reason is None:
            row["image"] = info.thumb  # what the models read from here on; the original stays in the tar
            out["sha256"] = hashlib.sha256(data).hexdigest()
            out["phash"] = dedup.phash_hex(info.grey)
            out.update(quality.metrics(info.grey))
        if reason is None and cur.quality.enabled:
            q = cur.quality
            reason = quality.verdict(out, q.min_sharpness, q.min_contrast, q.min_brightness, q.max_brightness)
        row["reason"] = reason or ""
    if row["reason"]:
        row["image"] = b""  # decided: no embedding needed, and it need not travel further
    out["t_measure"] = time.perf_counter() - t0
    return {**row, **out}


def _unreadable(src: str) -> str | None:
    """A local file that is no longer a readable regular file (sources.local_problem: a FIFO is never
    opened), checked before the read; a bucket object is read as it is."""
    if "://" in src:
        return None
    from curation import sources

    return sources.local_problem(src)


def size_verdict(height: int, width: int, min_tier: str) -> str | None:
    """`aspect_ratio` outside the bucket tables' 1:4..4:1, `too_small` below `min_tier`, else None."""
    if not buckets.MIN_ASPECT <= height / width <= buckets.MAX_ASPECT:
        return reasons.ASPECT_RATIO
    tier = buckets.tier_of(height, width)
    return reasons.TOO_SMALL if tier is None or TIER_RANK[tier] < TIER_RANK[min_tier] else None


def download_rows(batch: dict, work: Loc, downloads: Loc, cur: CurationConfig, source) -> Iterator[dict]:
    """Ray task body (I/O-bound): download each shard of the batch (unless done) and hand on its rows,
    which say where each image's bytes lie in the download tar; the bytes themselves stay on disk.
    `source` (inputs.UrlList, or sources.LocalImages for images on disk) makes the rows."""
    placement.mark(work, "download")
    for shard in batch["shard"]:
        shard = int(shard)
        rows: list[dict] = []
        for r in source.shard_rows(work, downloads, shard, cur):
            rows.append({**r, "shard": shard})
            if len(rows) == ROWS_PER_BLOCK:  # images read in the rows (a bucket tar's) go on in bounded blocks
                yield {k: [r[k] for r in rows] for k in rows[0]}
                rows = []
        if rows:
            yield {k: [r[k] for r in rows] for k in rows[0]}


def measure_rows(batch: dict, cur: CurationConfig, work: Loc | None = None, options: Any = None) -> dict:
    """Ray task body (CPU-bound): measure a few rows, decoding each image once (no download waits
    on it: the next shards download meanwhile)."""
    placement.mark(work, "measure")
    rows = [measure(dict(zip(batch, values)), cur, options) for values in zip(*batch.values())]
    out = {k: [r[k] for r in rows] for k in rows[0]}
    out["image"] = np.array(out["image"], dtype=object)
    return out


SCORE_REASONS = (reasons.NSFW, reasons.WATERMARK, reasons.LOW_AESTHETIC)  # in the order they are checked


def score_reasons(reason, aesthetic, nsfw, watermark, cur: CurationConfig) -> np.ndarray:
    """The reason after the score thresholds (NSFW, then watermark, then aesthetic) for each row; rows
    already decided keep theirs. The one place these thresholds are applied: the scoring actor."""
    out = np.array(reason, dtype=object)
    open_ = out == ""
    a, n, w = (np.asarray(x, np.float64) for x in (aesthetic, nsfw, watermark))
    rules = [
        (cur.nsfw.enabled, n >= cur.nsfw.threshold, reasons.NSFW),
        (cur.watermark.enabled, w >= cur.watermark.threshold, reasons.WATERMARK),
        (cur.aesthetic.enabled, ~(a >= cur.aesthetic.threshold), reasons.LOW_AESTHETIC),
    ]
    for enabled, hit, code in rules:
        if enabled:
            sel = open_ & hit
            out[sel] = code
            open_ &= ~sel
    return out


class Embed:
    """Ray actor: the aesthetic scorer (+ safety heads when enabled) on rows still undecided; the score
    thresholds are decided here, so the scored shard's `reason` is the record and only real survivors
    go on to dedup."""

    def __init__(
        self, clip: dict, aesthetic_head: str, safety: dict | None, cur: CurationConfig, work: Loc | None = None
    ):
        from encoders.aesthetic import AestheticScorer

        self.cur, self.work = cur, work
        self.scorer = AestheticScorer(clip["arch"], clip["weights"], clip.get("config_dir"), aesthetic_head)
        self.safety = None
        if safety:
            from encoders.safety import SafetyScorer

            self.safety = SafetyScorer(**safety)

    def __call__(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        batch = self.scorer(batch)
        n = len(batch["key"])
        batch["nsfw"] = np.full(n, np.nan, np.float32)
        batch["watermark"] = np.full(n, np.nan, np.float32)
        if self.safety is not None:
            batch = self.safety(batch)
        reason = batch["reason"] if "reason" in batch else np.full(n, "", dtype=object)
        batch["reason"] = score_reasons(reason, batch["aesthetic"], batch["nsfw"], batch["watermark"], self.cur).astype(
            str
        )
        placement.mark(self.work, "embed")
        batch["embedding"] = np.array(
            [e.astype(np.float16).tobytes() if np.any(e) else b"" for e in batch.pop("clip_embedding")], dtype=object
        )
        batch["t_embed"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        del batch["image"]  # images stop here: the driver only ever sees scores
        return batch


def score_shards(pending: list[int], work: Loc, downloads: Loc, cfg: Config, source) -> None:
    """Run the streaming flow over `pending` download shards; write each shard's scored file when complete."""
    import ray

    cur, res = cfg.curation, cfg.curation.aesthetic_resources
    expected = {i: _rows(work / "input" / f"{i:05d}.parquet") for i in pending}
    safety = None
    if cur.nsfw.enabled or cur.watermark.enabled:
        safety = {
            "nsfw_head": cfg.models.nsfw_head if cur.nsfw.enabled else None,
            "watermark": cfg.models.watermark if cur.watermark.enabled else None,
        }
    ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        download_rows,
        batch_size=1,
        compute=ray.data.TaskPoolStrategy(cur.download.processes),
        num_cpus=cur.download.num_cpus,
        fn_kwargs={"work": work, "downloads": downloads, "cur": cur, "source": source},
    )
    # other resources than the download tasks': never fused with them, so decoding never stalls a download
    ds = ds.map_batches(
        measure_rows,
        batch_size=MEASURE_BATCH,
        num_cpus=1,
        memory=MEASURE_MEMORY,
        fn_kwargs={"cur": cur, "work": work, "options": cfg.storage},
    )
    ds = ds.map_batches(
        Embed,
        batch_size=res.batch_size,
        num_gpus=res.num_gpus,
        num_cpus=res.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=res.concurrency),
        fn_constructor_kwargs={
            "clip": vars(cfg.models.clip).copy(),
            "aesthetic_head": cfg.models.aesthetic_head,
            "safety": safety,
            "cur": cur,
            "work": work,
        },
    )
    gather = ShardGather(expected)
    done = 0
    shard_word, item_word = source.words  # "download shard", "URLs"; on disk: "source shard", "images"
    downloading = shard_word.startswith("download")
    desc, unit = ("download+score", "url") if downloading else ("read+score", "image")  # the rate: url/s, s/image
    with progress.bar(sum(expected.values()), unit, desc) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                shard = int(row.pop("shard"))
                rows = gather.add(shard, row)
                if rows is not None:
                    write_scored(work / "scored" / f"{shard:05d}.parquet", rows)
                    done += 1
                    progress.say(
                        f"{shard_word} {shard:05d}: {expected[shard]} {item_word} scored ({done}/{len(pending)} shards)"
                    )  # the log's progress (no bar off a TTY)
            bar.update(len(batch))
    gather.close()


def _rows(path: Loc) -> int:
    """Rows of a parquet file, from its footer."""
    with storage.parquet_file(path) as f:
        return int(f.metadata.num_rows)


def write_scored(path: Loc, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.table({c: [r.get(c) for r in rows] for c in SCORED_COLUMNS})
    atomic.write_parquet(path, table)


# ---------------------------------------------------------------------------------------------
# The whole stage
# ---------------------------------------------------------------------------------------------


@fingerprint.releases_locks  # the OUT lock is held for this run only
def run(urls, out: str | Path | Loc, cfg: Config, dedup_against: list = ()) -> dict:
    """Curate `urls` into `out` (a folder or a bucket prefix: a storage Loc, or a path resolved with
    `cfg.storage`); resumes whatever a previous run with the same arguments finished.
    `urls`: a URL list's path (columns from `curation.url_col` / `caption_col` or found), or a resolved
    input (inputs.UrlList, sources.LocalImages: images on disk, no download).
    `dedup_against`: earlier runs' folders whose kept images new ones are deduplicated against."""
    cur = cfg.curation
    source = urls if hasattr(urls, "shard_rows") else inputs.url_list(urls, cur.url_col, cur.caption_col, cfg.storage)
    out = out if isinstance(out, Loc) else storage.resolve(out, cfg.storage)
    against = dedup_job.earlier_runs(dedup_against, out)
    fp = stage_fingerprint(source, cfg, against)
    if (out / fingerprint.FILE).has_file():  # a resume: refused if the URL list, a setting or an earlier run changed
        fingerprint.check(out, fp, lease=True)
    if (out / "stats.json").has_file() and (out / MANIFEST).has_file():
        return json.loads((out / "stats.json").read_text())
    cur = cfg.curation
    work, downloads = out / "_work", out / "downloads"
    timings = {}
    storage.take_retries()  # stats.json counts this run's
    t0 = time.time()
    n_shards = source.split(work / "input", cur.download.shard_size)
    fingerprint.check(out, fp, lease=True)  # recorded once the URL list is known to be readable
    timings["split"] = time.time() - t0
    for folder in (work / "scored", downloads, out / "shards"):
        folder.mkdir()
        atomic.clean_temp(folder)
    ray_start.init_ray(cfg)
    t0 = time.time()
    pending = [i for i in range(n_shards) if not (work / "scored" / f"{i:05d}.parquet").has_file()]
    if pending:
        score_shards(pending, work, downloads, cfg, source)
    timings["download_score"] = time.time() - t0
    t0 = time.time()
    dups = dedup_job.run(work, n_shards, cur, against)
    timings["decide"] = time.time() - t0
    t0 = time.time()
    written = outputs.write(out, n_shards, dups, cur, cfg.storage)
    timings["write"] = time.time() - t0
    stats = {**summarize(out, work, n_shards, timings, written), **storage.retry_stats(out)}
    atomic.write_text(out / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")
    from curation.report import write_report

    write_report(out, cur)  # report.html last: the manifest and stats.json it reads are complete
    return stats


def stage_fingerprint(source, cfg: Config, against: list[Loc] = ()) -> dict:
    """The input (a URL list's bytes; images on disk: fingerprint.listing of their files), the settings that
    change what is kept, the scoring models' bytes, and the earlier runs deduplicated against (folder +
    a listing of its dedup index)."""
    m = cfg.models
    heads = {f"models.{k}": getattr(m, k) for k in ("aesthetic_head", "nsfw_head", "watermark")}
    return {
        **source.fingerprint(),
        **fingerprint.flat(cfg.curation, "curation"),
        **{k: fingerprint.file_digest(v) if v and Path(v).is_file() else v for k, v in heads.items()},
        "models.clip": f"{m.clip.arch}/{Path(m.clip.weights).name}",
        **(
            {
                "--dedup-against": [
                    f"{r} {fingerprint.listing((r / dedup_job.INDEX).glob('*.parquet'))}" for r in against
                ]
            }
            if against
            else {}
        ),
    }


def summarize(out: Loc, work: Loc, n_shards: int, timings: dict, written: dict) -> dict:
    """Counts by status, reason and tier, step timings and img2dataset's own stats (streamed: one
    row group of three columns at a time)."""
    status, reason, tier = Counter(), Counter(), Counter()
    with storage.parquet_file(out / MANIFEST) as manifest:
        for b in manifest.iter_batches(columns=["status", "reason", "tier"]):
            st, why, ti = (b.column(c).to_pylist() for c in ("status", "reason", "tier"))
            status.update(st)
            reason.update(r for r in why if r is not None)
            tier.update(t for s_, t in zip(st, ti) if s_ == reasons.KEPT and t is not None)
    cpu = {"measure_cpu": 0.0, "embed_cpu": 0.0}
    for i in range(n_shards):
        t = storage.read_parquet(work / "scored" / f"{i:05d}.parquet", columns=["t_measure", "t_embed"])
        cpu["measure_cpu"] += float(pc.sum(t["t_measure"]).as_py() or 0)
        cpu["embed_cpu"] += float(pc.sum(t["t_embed"]).as_py() or 0)
    return {
        "urls": sum(status.values()),
        "status": dict(status.most_common()),
        "reason": dict(reason.most_common()),
        "tier": dict(tier.most_common()),
        "kept": written["kept"],
        "shards": written["shards"],
        "seconds": {**{k: round(v, 3) for k, v in timings.items()}, **{k: round(v, 3) for k, v in cpu.items()}},
        "nodes": placement.counts(work),
        "img2dataset": download.shard_stats(out / "downloads", n_shards),
        **_input_counts(work),
    }


def _input_counts(work: Loc) -> dict:
    """What the split of an on-disk input counted (captions_not_utf8: sources.CAPTIONS), else nothing."""
    from curation import sources

    path = work / "input" / sources.CAPTIONS
    return json.loads(path.read_text()) if path.has_file() else {}
