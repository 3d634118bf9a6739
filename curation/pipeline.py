"""The curation stage as one streaming Ray Data flow, resumable per shard.

    URL list -> input shards -> download (img2dataset; I/O-bound Ray tasks, `download.processes` at once)
             -> measure (decode once: size, tier, quality, hashes; CPU-bound Ray tasks, one per core)
             -> [CLIP embedding + aesthetic (+ safety)] Ray actors -> scored/NNNNN.parquet (driver: no images)
             -> decide (thresholds, dedup over the whole run) -> shards/NNNNN.tar (Ray tasks) + manifest.parquet

Layout of DIR (each file written once, atomically; what exists is what is done):
    _work/input/NNNNN.parquet     the URL list cut into download shards, keyed, carried columns kept
    downloads/NNNNN_stats.json    img2dataset's per-shard stats (+ .parquet; the .tar is removed at the end)
    _work/scored/NNNNN.parquet    one row per URL of the shard: reason so far, size, tier, scores, hashes
    shards/NNNNN.tar              kept images; manifest.parquet and stats.json last (their presence = complete)
"""
from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common import progress
from common.config import Config, CurationConfig
from curation import dedup, download, metadata, quality
from shards import atomic, buckets, fingerprint, reasons
from shards.errors import SigmaError
from shards.format import MANIFEST, MANIFEST_COLUMNS, shard_name

SCORED_COLUMNS = ["key", "url", "reason", "width", "height", "tier", "ext", "sharpness", "contrast", "brightness",
                  "sha256", "phash", "aesthetic", "nsfw", "watermark", "src", "offset", "size", "embedding",
                  "t_measure", "t_embed"]
TIER_RANK = {t: i for i, t in enumerate(buckets.CURATION_TIERS)}
MEASURE_BATCH = 4  # rows per measuring task: a few seconds of decoding for 4K photos
MEASURE_MEMORY = 512 * 2**20  # per measuring task: one decode at a time (<= 64 MP after the bomb guard) + 4 originals


# ---------------------------------------------------------------------------------------------
# Per-shard: download + measure (a Ray task), embedding + scores (Ray actors)
# ---------------------------------------------------------------------------------------------


def measure(row: dict, cur: CurationConfig) -> dict:
    """Decode-safe size, tier, quality and hashes of one downloaded row; sets `reason` when rejected.
    `image` becomes the small JPEG the models read (empty once the row is decided)."""
    t0 = time.perf_counter()
    out = {"width": 0, "height": 0, "tier": "", "ext": "", "sharpness": np.nan, "contrast": np.nan,
           "brightness": np.nan, "sha256": "", "phash": ""}
    row["image"] = b""
    if not row["reason"]:
        data = download.read_member(row["src"], row["offset"], row["size"])
        info = metadata.inspect(data, cur.max_pixels, lambda h, w: size_verdict(h, w, cur.min_tier),
                                cur.measure_seconds)
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


def size_verdict(height: int, width: int, min_tier: str) -> str | None:
    """`aspect_ratio` outside the bucket tables' 1:4..4:1, `too_small` below `min_tier`, else None."""
    if not buckets.MIN_ASPECT <= height / width <= buckets.MAX_ASPECT:
        return reasons.ASPECT_RATIO
    tier = buckets.tier_of(height, width)
    return reasons.TOO_SMALL if tier is None or TIER_RANK[tier] < TIER_RANK[min_tier] else None


def download_rows(batch: dict, work: str, downloads: str, cur: CurationConfig) -> Iterator[dict]:
    """Ray task body (I/O-bound): download each shard of the batch (unless done) and hand on its rows,
    which say where each image's bytes lie in the download tar; the bytes themselves stay on disk."""
    d = cur.download
    for shard in batch["shard"]:
        shard = int(shard)
        src = Path(work) / "input" / f"{shard:05d}.parquet"
        download.download_shard(src, Path(downloads), shard, download.crawl_of(d))
        rows = [{**r, "shard": shard} for r in download.iter_shard(src, Path(downloads), shard)]
        yield {k: [r[k] for r in rows] for k in rows[0]}


def measure_rows(batch: dict, cur: CurationConfig) -> dict:
    """Ray task body (CPU-bound): measure a few rows, decoding each image once (no download waits
    on it: the next shards download meanwhile)."""
    rows = [measure(dict(zip(batch, values)), cur) for values in zip(*batch.values())]
    out = {k: [r[k] for r in rows] for k in rows[0]}
    out["image"] = np.array(out["image"], dtype=object)
    return out


class Embed:
    """Ray actor: the aesthetic scorer (+ safety heads when enabled) on rows still undecided."""

    def __init__(self, clip: dict, aesthetic_head: str, safety: dict | None = None):
        from encoders.aesthetic import AestheticScorer

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
        batch["embedding"] = np.array([e.astype(np.float16).tobytes() if np.any(e) else b""
                                       for e in batch.pop("clip_embedding")], dtype=object)
        batch["t_embed"] = np.full(n, (time.perf_counter() - t0) / max(n, 1))
        del batch["image"]  # images stop here: the driver only ever sees scores
        return batch


def score_shards(pending: list[int], work: Path, downloads: Path, cfg: Config) -> None:
    """Run the streaming flow over `pending` download shards; write each shard's scored file when complete."""
    import ray

    cur, res = cfg.curation, cfg.curation.aesthetic_resources
    expected = {i: pq.ParquetFile(work / "input" / f"{i:05d}.parquet").metadata.num_rows for i in pending}
    safety = None
    if cur.nsfw.enabled or cur.watermark.enabled:
        safety = {"nsfw_head": cfg.models.nsfw_head if cur.nsfw.enabled else None,
                  "watermark": cfg.models.watermark if cur.watermark.enabled else None}
    ds = ray.data.from_items([{"shard": i} for i in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(download_rows, batch_size=1, compute=ray.data.TaskPoolStrategy(cur.download.processes),
                        num_cpus=cur.download.num_cpus, fn_kwargs={"work": str(work), "downloads": str(downloads),
                                                                   "cur": cur})
    # other resources than the download tasks': never fused with them, so decoding never stalls a download
    ds = ds.map_batches(measure_rows, batch_size=MEASURE_BATCH, num_cpus=1, memory=MEASURE_MEMORY,
                        fn_kwargs={"cur": cur})
    ds = ds.map_batches(
        Embed, batch_size=res.batch_size, num_gpus=res.num_gpus, num_cpus=res.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=res.concurrency),
        fn_constructor_kwargs={"clip": vars(cfg.models.clip).copy(), "aesthetic_head": cfg.models.aesthetic_head,
                               "safety": safety})
    rows: dict[int, list[dict]] = {i: [] for i in pending}
    done = 0
    with progress.bar(sum(expected.values()), "url", "download+score") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            for row in batch.to_dict("records"):
                shard = int(row.pop("shard"))
                rows[shard].append(row)
                if len(rows[shard]) == expected[shard]:
                    write_scored(work / "scored" / f"{shard:05d}.parquet", rows.pop(shard))
                    done += 1
                    progress.say(f"download shard {shard:05d}: {expected[shard]} URLs scored "
                                 f"({done}/{len(pending)} shards)")  # the log's progress (no bar off a TTY)
            bar.update(len(batch))


def write_scored(path: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: r["key"])
    table = pa.table({c: [r.get(c) for r in rows] for c in SCORED_COLUMNS})
    atomic.write_parquet(path, table)


# ---------------------------------------------------------------------------------------------
# Decisions over the whole run
# ---------------------------------------------------------------------------------------------


def decide(scored: Path, n_shards: int, cur: CurationConfig) -> dict[str, tuple[str, str | None]]:
    """{key: (reason, dup_of)} for rows that survived measuring but are dropped by scores or dedup."""
    cols = ["key", "reason", "width", "height", "sha256", "phash", "aesthetic", "nsfw", "watermark", "embedding"]
    cand = {c: [] for c in cols}
    for i in range(n_shards):
        t = pq.read_table(scored / f"{i:05d}.parquet", columns=cols).filter(pc.field("reason") == "")
        for c in cols:
            cand[c].extend(t[c].to_pylist())
    out: dict[str, tuple[str, str | None]] = {}
    survivors = []
    for i, key in enumerate(cand["key"]):
        a, n, w = cand["aesthetic"][i], cand["nsfw"][i], cand["watermark"][i]
        if cur.nsfw.enabled and n is not None and n >= cur.nsfw.threshold:
            out[key] = (reasons.NSFW, None)
        elif cur.watermark.enabled and w is not None and w >= cur.watermark.threshold:
            out[key] = (reasons.WATERMARK, None)
        elif cur.aesthetic.enabled and (a is None or np.isnan(a) or a < cur.aesthetic.threshold):
            out[key] = (reasons.LOW_AESTHETIC, None)
        else:
            survivors.append(i)
    if cur.dedup.enabled and survivors:
        emb = None
        if cur.dedup.clip_similarity is not None:
            dim = max((len(cand["embedding"][i]) // 2 for i in survivors), default=0)
            emb = np.zeros((len(survivors), max(dim, 1)), np.float32)
            for j, i in enumerate(survivors):
                if cand["embedding"][i]:
                    emb[j] = np.frombuffer(cand["embedding"][i], np.float16)
        dups = dedup.find_duplicates(
            [cand["key"][i] for i in survivors], [cand["width"][i] * cand["height"][i] for i in survivors],
            [cand["sha256"][i] for i in survivors], [cand["phash"][i] for i in survivors], emb,
            cur.dedup.phash_radius, cur.dedup.clip_similarity)
        out.update({k: (reasons.DUPLICATE, v) for k, v in dups.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Outputs: shards (Ray tasks) + manifest (driver, metadata only)
# ---------------------------------------------------------------------------------------------


def write_outputs(out: Path, work: Path, n_shards: int, decisions: dict, cur: CurationConfig) -> dict:
    """Manifest rows in key order, streamed shard by shard; kept rows numbered into output shards
    that Ray tasks write (at most a few in flight). The manifest gets its name last."""
    import ray

    from curation import report, writer

    write_task = ray.remote(num_cpus=0.25)(writer.write_shard)
    thumbs_task = ray.remote(num_cpus=0.25)(report.save_rejected_thumbnails)
    shard_dir = out / "shards"
    in_flight, members, kept, thumbs = [], [], 0, defaultdict(int)
    first = pq.read_table(work / "input" / "00000.parquet")
    carried = [c for c in first.column_names if c not in ("key", "url")]
    schema = _manifest_schema(first.schema, carried)

    def submit(index: int, chunk: list[dict]) -> None:
        path = shard_dir / shard_name(index)
        if not path.exists():
            in_flight.append(write_task.remote(str(path), chunk))
        while len(in_flight) > 4:
            done, _ = ray.wait(in_flight, num_returns=1)
            in_flight.remove(done[0])
            ray.get(done[0])

    with atomic.atomic_path(out / MANIFEST) as tmp, pq.ParquetWriter(tmp, schema) as manifest, \
            progress.bar(n_shards, "shard", "write") as bar:
        for i in range(n_shards):
            rows = manifest_rows(work, i, decisions, carried)
            rejected = []  # the report's galleries show a few per reason: thumbnail only those (decoding 4K costs)
            for r, m in rows:
                if r["status"] == reasons.REJECTED and m["src"] and thumbs[r["reason"]] < report.THUMBS_PER_REASON:
                    thumbs[r["reason"]] += 1
                    rejected.append({"key": m["key"], "reason": r["reason"], "src": m["src"], "offset": m["offset"],
                                     "size": m["size"]})
            if rejected:  # while the download tar still exists
                in_flight.append(thumbs_task.remote(str(out), rejected))
            for row, member in rows:
                if row["status"] == reasons.KEPT:
                    row["shard"] = member["meta"]["shard"] = shard_name(kept // cur.shard_size)
                    members.append(member)
                    kept += 1
                    if len(members) == cur.shard_size:
                        submit(kept // cur.shard_size - 1, members)
                        members = []
            manifest.write_table(pa.Table.from_pylist([r for r, _ in rows], schema=schema))
            bar.update(1)
        if members:
            submit((kept - 1) // cur.shard_size, members)
        ray.get(in_flight)
    return {"kept": kept, "shards": (kept + cur.shard_size - 1) // cur.shard_size}


def manifest_rows(work: Path, shard: int, decisions: dict, carried: list[str]) -> list[tuple[dict, dict | None]]:
    """(manifest row, where its bytes are + its .json/.txt) per input row of one download shard, in key order."""
    inputs = pq.read_table(work / "input" / f"{shard:05d}.parquet").to_pylist()
    scored = {r["key"]: r for r in pq.read_table(work / "scored" / f"{shard:05d}.parquet").to_pylist()}
    out = []
    for inp in inputs:
        s = scored[inp["key"]]
        reason, dup_of = decisions.get(s["key"], (s["reason"] or None, None))
        row = {"url": inp["url"], "key": inp["key"], "status": reasons.status_of(reason), "reason": reason,
               "width": s["width"] or None, "height": s["height"] or None, "tier": s["tier"] or None,
               "aesthetic": _num(s["aesthetic"]), "sharpness": _num(s["sharpness"]), "contrast": _num(s["contrast"]),
               "brightness": _num(s["brightness"]), "nsfw": _num(s["nsfw"]), "watermark": _num(s["watermark"]),
               "sha256": s["sha256"] or None, "phash": s["phash"] or None, "dup_of": dup_of, "shard": None,
               **{c: inp[c] for c in carried}}
        member = {"key": row["key"], "src": s["src"], "offset": s["offset"], "size": s["size"], "ext": s["ext"],
                  "meta": dict(row), "caption": inp.get("caption")}
        out.append((row, member))
    return out


def _num(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else float(v)


def _manifest_schema(inputs: pa.Schema, carried: list[str]) -> pa.Schema:
    types = {"width": pa.int64(), "height": pa.int64(), "aesthetic": pa.float64(), "sharpness": pa.float64(),
             "contrast": pa.float64(), "brightness": pa.float64(), "nsfw": pa.float64(), "watermark": pa.float64()}
    fields = [pa.field(c, types.get(c, pa.string())) for c in MANIFEST_COLUMNS]
    return pa.schema(fields + [inputs.field(c) for c in carried])


# ---------------------------------------------------------------------------------------------
# The whole stage
# ---------------------------------------------------------------------------------------------


def run(urls: str | Path, out: str | Path, cfg: Config) -> dict:
    """Curate `urls` into `out`; resumes whatever a previous run with the same arguments finished."""
    from common import cli

    out = Path(out).resolve()
    fp = stage_fingerprint(urls, cfg)
    if (out / fingerprint.FILE).exists():  # a resume: refused if the URL list or a setting changed
        fingerprint.check(out, fp)
    if (out / "stats.json").exists() and (out / MANIFEST).exists():
        return json.loads((out / "stats.json").read_text())
    cur = cfg.curation
    work, downloads = out / "_work", out / "downloads"
    timings = {}
    t0 = time.time()
    n_shards = download.split_input(urls, work / "input", cur.download.shard_size)
    fingerprint.check(out, fp)  # recorded once the URL list is known to be readable
    timings["split"] = time.time() - t0
    for folder in (work / "scored", downloads, out / "shards"):
        folder.mkdir(parents=True, exist_ok=True)
        atomic.clean_temp(folder)
    cli.init_ray(cfg)
    t0 = time.time()
    pending = [i for i in range(n_shards) if not (work / "scored" / f"{i:05d}.parquet").exists()]
    if pending:
        score_shards(pending, work, downloads, cfg)
    timings["download_score"] = time.time() - t0
    t0 = time.time()
    decisions = decide(work / "scored", n_shards, cur)
    timings["decide"] = time.time() - t0
    t0 = time.time()
    written = write_outputs(out, work, n_shards, decisions, cur)
    timings["write"] = time.time() - t0
    stats = summarize(out, work, n_shards, timings, written)
    atomic.write_text(out / "stats.json", json.dumps(stats, indent=2, default=str) + "\n")
    for tar in downloads.glob("*.tar"):  # every kept image now lives in shards/: free the disk
        tar.unlink()
    from curation.report import write_report

    write_report(out, cur)  # report.html last: the manifest and stats.json it reads are complete
    return stats


def stage_fingerprint(urls: str | Path, cfg: Config) -> dict:
    """The URL list's bytes, the settings that change what is kept, and the scoring models' bytes."""
    if not Path(urls).is_file():
        raise SigmaError(f"{urls}: URL list not found")
    m = cfg.models
    heads = {f"models.{k}": getattr(m, k) for k in ("aesthetic_head", "nsfw_head", "watermark")}
    return {"--urls": fingerprint.file_digest(urls),
            **fingerprint.flat(cfg.curation, "curation", skip=_NOT_IN_OUTPUT),
            **{k: fingerprint.file_digest(v) if v and Path(v).is_file() else v for k, v in heads.items()},
            "models.clip": f"{m.clip.arch}/{Path(m.clip.weights).name}"}


_NOT_IN_OUTPUT = ("download.processes", "download.threads", "download.num_cpus", "download.per_domain_limit",
                  "download.contact", "aesthetic_resources")  # concurrency and courtesy: the same output


def summarize(out: Path, work: Path, n_shards: int, timings: dict, written: dict) -> dict:
    """Counts by status, reason and tier, step timings and img2dataset's own stats."""
    m = pq.read_table(out / MANIFEST, columns=["status", "reason", "tier"]).to_pandas()
    t = pa.concat_tables([pq.read_table(work / "scored" / f"{i:05d}.parquet", columns=["t_measure", "t_embed"])
                          for i in range(n_shards)]).to_pandas()
    return {
        "urls": len(m),
        "status": m["status"].value_counts().to_dict(),
        "reason": m["reason"].dropna().value_counts().to_dict(),
        "tier": m.loc[m["status"] == reasons.KEPT, "tier"].value_counts().to_dict(),
        "kept": written["kept"], "shards": written["shards"],
        "seconds": {**{k: round(v, 3) for k, v in timings.items()},
                    "measure_cpu": round(float(t["t_measure"].sum()), 3),
                    "embed_cpu": round(float(t["t_embed"].sum()), 3)},
        "img2dataset": download.shard_stats(out / "downloads"),
    }
