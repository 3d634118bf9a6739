"""The dataset report: one self-contained HTML page per curated run, `CURDIR/report.html`.

People look at pictures and plots before they trust a threshold, so the page shows counts by
status and reason, histograms of every quantity a threshold acts on (with the configured
threshold drawn), and galleries: kept images with the highest and lowest aesthetic scores,
rejected images per reason, and duplicate groups side by side. Plots and thumbnails are embedded
as data URIs (common/pages.py), so the file opens from disk with no server.

Kept images are read from the curated shards. Rejected images are not in the shards: their
thumbnails come from `CURDIR/thumbs/KEY.jpg`, which curation writes with `save_thumbnail` for a
bounded sample of each reason (`THUMBS_PER_REASON`); a rejected row without one gets a text tile.
Reads only what it shows: the manifest's columns and the gallery images' tar members.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from common import pages
from common.config import CurationConfig, to_dict
from curation.download import read_member
from shards import atomic, buckets, format, reasons
from shards.errors import SigmaError

REPORT = "report.html"
STATS = "stats.json"
THUMBS = "thumbs"  # CURDIR/thumbs/KEY.jpg: thumbnails of rejected images (kept ones are in the shards)
THUMBS_PER_REASON = 24  # what curation should save per reason and download shard; the report shows up to this
GALLERY = 24  # tiles per gallery
DUP_GROUPS = 12  # duplicate groups shown, largest first
FAILED_EXAMPLES = 5  # example URLs per failure reason

NUMERIC = ["width", "height", "aesthetic", "sharpness", "contrast", "brightness", "nsfw", "watermark"]


# ---------------------------------------------------------------------------------------------
# Thumbnails of rejected images (written by curation, read here)
# ---------------------------------------------------------------------------------------------


def thumb_path(curdir: str | Path, key: str) -> Path:
    return Path(curdir) / THUMBS / f"{key}.jpg"


def save_thumbnail(curdir: str | Path, key: str, data: bytes, side: int = 256) -> bool:
    """Write CURDIR/thumbs/KEY.jpg (longest side `side`) from encoded bytes; False if undecodable."""
    import base64

    uri = pages.thumbnail_uri(data, side)
    if uri is None:
        return False
    atomic.write_bytes(thumb_path(curdir, key), base64.b64decode(uri.split(",", 1)[1]))
    return True


def save_rejected_thumbnails(curdir: str | Path, rows, per_reason: int = THUMBS_PER_REASON) -> int:
    """Thumbnails for up to `per_reason` rejected rows per reason, read from their download tars.

    rows: dicts with key, reason, src, offset, size (the image bytes' place in a download tar,
    as curation records them). Call once per download shard, before the download tars are
    deleted. Rows without bytes (src "") and existing thumbnails are skipped; returns how many
    were written.
    """
    taken: dict[str, int] = defaultdict(int)
    written = 0
    for row in rows:
        reason = row.get("reason")
        if not reason or not row.get("src") or taken[reason] >= per_reason:
            continue
        taken[reason] += 1
        if thumb_path(curdir, row["key"]).exists():
            continue
        written += save_thumbnail(curdir, row["key"], read_member(row["src"], row["offset"], row["size"]))
    return written


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------


def read_manifest(curdir: str | Path):
    """The manifest's own columns (not the carried ones) as a DataFrame, numeric columns coerced."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = Path(curdir) / format.MANIFEST
    if not path.is_file():
        raise SigmaError(f"{path}: no manifest (is this a curated run folder?)")
    present = set(pq.read_schema(path).names)  # the manifest's own columns only, not the carried ones
    df = pd.read_parquet(path, columns=[c for c in format.MANIFEST_COLUMNS if c in present])
    for col in format.MANIFEST_COLUMNS:
        if col not in df:
            df[col] = None
    for col in NUMERIC:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("status", "reason", "tier", "dup_of", "key", "url"):
        df[col] = df[col].fillna("").astype(str)
    return df


def shard_path(curdir: Path, value) -> Path | None:
    """The tar a manifest `shard` value names: an index (3, "00003") or a file name/path."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, (int, float)) or str(value).isdigit():
        return curdir / "shards" / format.shard_name(int(value))
    p = Path(str(value))
    return p if p.is_absolute() else (curdir / p if (curdir / p).is_file() else curdir / "shards" / p.name)


def read_images(curdir: Path, rows) -> dict[str, bytes]:
    """{key: original bytes} for the given kept rows, reading only their tars' image members."""
    wanted: dict[Path | None, set[str]] = defaultdict(set)
    for key, shard in zip(rows["key"], rows["shard"]):
        wanted[shard_path(curdir, shard)].add(key)
    if None in wanted:  # no shard recorded: look in every shard
        lost = wanted.pop(None)
        for p in sorted((curdir / "shards").glob("*.tar")):
            wanted[p] |= lost
    found: dict[str, bytes] = {}
    for path, keys in wanted.items():
        if keys - set(found) and path.is_file():
            found.update(pages.tar_images(path, keys - set(found)))
    return found


def thumb_keys(curdir: Path) -> set[str]:
    """Keys that have a saved thumbnail (one directory listing, not a stat per manifest row)."""
    folder = Path(curdir) / THUMBS
    if not folder.is_dir():
        return set()
    with os.scandir(folder) as it:
        return {e.name[:-4] for e in it if e.name.endswith(".jpg")}


def read_thumbs(curdir: Path, keys) -> dict[str, str]:
    """{key: data URI} for the rejected keys that have a saved thumbnail."""
    out = {}
    for key in keys:
        p = thumb_path(curdir, key)
        if p.is_file():
            out[key] = pages.data_uri(p.read_bytes(), "image/jpeg")
    return out


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _counts(df, stats: dict) -> str:
    total = len(df)
    by_status = df["status"].value_counts()
    rows = [(s, int(by_status.get(s, 0)), f"{100 * by_status.get(s, 0) / max(total, 1):.1f}%")
            for s in reasons.STATUSES]
    out = ["<h2>Counts</h2>", pages.table(["status", "images", "share"], rows + [("total", total, "100%")], "status")]
    detail = df[df["status"] != reasons.KEPT].groupby(["status", "reason"]).size().sort_values(ascending=False)
    out.append(pages.table(["status", "reason", "images"],
                          [(s, r or "(none)", int(n)) for (s, r), n in detail.items()], "reason"))
    if stats:
        out.append(f"<details><summary>stats.json</summary><pre>{pages.esc(json.dumps(stats, indent=2))}</pre>"
                   "</details>")
    return "\n".join(out)


def _thresholds(cur: CurationConfig) -> str:
    q, d = cur.quality, cur.download
    rows = [
        ("min_tier", cur.min_tier),
        ("quality", "on" if q.enabled else "off"),
        ("quality.min_sharpness", q.min_sharpness), ("quality.min_contrast", q.min_contrast),
        ("quality.min_brightness", q.min_brightness), ("quality.max_brightness", q.max_brightness),
        ("aesthetic.threshold", f"{cur.aesthetic.threshold:g} ({'on' if cur.aesthetic.enabled else 'off'})"),
        ("nsfw.threshold", f"{cur.nsfw.threshold:g} ({'on' if cur.nsfw.enabled else 'off'})"),
        ("watermark.threshold", f"{cur.watermark.threshold:g} ({'on' if cur.watermark.enabled else 'off'})"),
        ("dedup.phash_radius", cur.dedup.phash_radius if cur.dedup.enabled else "off"),
        ("dedup.clip_similarity", cur.dedup.clip_similarity if cur.dedup.enabled and
         cur.dedup.clip_similarity is not None else "off"),
        ("download.allow_networks", ", ".join(d.allow_networks) or "none: global addresses only"),
        ("download.max_bytes", f"{d.max_bytes:,}"), ("download.max_seconds", f"{d.max_seconds:g}"),
        ("download.robots_txt", "on" if d.robots_txt else "off"),
    ]
    return "<h2>Thresholds</h2>" + pages.table(["setting", "value"], rows, "thresholds")


def _on(label: str, enabled: bool) -> str:
    return label if enabled else f"{label} (off)"


def _histograms(df, cur: CurationConfig) -> str:
    """Every quantity a threshold acts on, over all decoded images, with the thresholds drawn."""
    d = df[(df["width"] > 0) & (df["height"] > 0)]
    side = int(buckets.TIER_TABLES[cur.min_tier])
    q = cur.quality
    plots = [
        pages.histogram("width", d["width"], "Width", "pixels", [(f"{cur.min_tier} side", side)]),
        pages.histogram("height", d["height"], "Height", "pixels", [(f"{cur.min_tier} side", side)]),
        pages.histogram("aspect", d["height"] / d["width"], "Aspect ratio", "height / width",
                       [("min bucket", buckets.MIN_ASPECT), ("max bucket", buckets.MAX_ASPECT)], log_x=True),
    ]
    tiers = d["tier"].replace("", "below 1k").replace("None", "below 1k").value_counts()
    order = ["below 1k", *buckets.CURATION_TIERS]
    plots.append(pages.bars("tier", {t: int(tiers.get(t, 0)) for t in order}, f"Tier (n={len(d):,})",
                           marked=cur.min_tier))
    scored = [
        ("aesthetic", "Aesthetic score", "LAION aesthetic (1-10)",
         [(_on("threshold", cur.aesthetic.enabled), cur.aesthetic.threshold)]),
        ("sharpness", "Sharpness", "variance of the Laplacian", [(_on("min", q.enabled), q.min_sharpness)]),
        ("contrast", "Contrast", "std of grey levels", [(_on("min", q.enabled), q.min_contrast)]),
        ("brightness", "Brightness", "mean grey level",
         [(_on("min", q.enabled), q.min_brightness), (_on("max", q.enabled), q.max_brightness)]),
        ("nsfw", "NSFW probability", "punsafe", [(_on("threshold", cur.nsfw.enabled), cur.nsfw.threshold)]),
        ("watermark", "Watermark probability", "pwatermark",
         [(_on("threshold", cur.watermark.enabled), cur.watermark.threshold)]),
    ]
    for col, title, xlabel, lines in scored:
        if d[col].notna().any():  # nsfw / watermark are null when their filters never ran
            plots.append(pages.histogram(col, d[col], title, xlabel, lines, log_x=col == "sharpness"))
    return "<h2>Distributions</h2><p class=\"muted\">All decoded images (kept and rejected); dashed lines: " \
           "the configured thresholds.</p>\n<div class=\"plots\">" + "".join(plots) + "</div>"


def _tile_lines(row) -> list[str]:
    lines = [row["key"], f"{int(row['width'])}x{int(row['height'])}" if row["width"] > 0 else ""]
    if not math.isnan(row["aesthetic"]):
        lines.append(f"aesthetic {row['aesthetic']:.3g}")
    if row["reason"]:
        lines.append(row["reason"])
    if row["dup_of"]:
        lines.append(f"dup of {row['dup_of']}")
    return [x for x in lines if x]


def _galleries(curdir: Path, df) -> str:
    import pandas as pd

    kept = df[df["status"] == reasons.KEPT]
    rejected = df[df["status"] == reasons.REJECTED]
    scored = kept[kept["aesthetic"].notna()].sort_values("aesthetic", ascending=False)
    half = min(GALLERY, (len(scored) + 1) // 2)  # a small run: top and bottom never show the same image
    top, bottom = scored.head(half), scored.tail(min(GALLERY, len(scored) - half)).iloc[::-1]
    groups = (rejected[rejected["dup_of"] != ""].groupby("dup_of").size()
              .sort_values(ascending=False).head(DUP_GROUPS))
    # per reason, rows with a saved thumbnail first (curation saves a sample of each reason)
    have = rejected["key"].isin(thumb_keys(curdir))
    shown_rejected = rejected.assign(_t=have).sort_values("_t", ascending=False, kind="stable") \
        .groupby("reason").head(GALLERY)
    dup_rows = rejected[rejected["dup_of"].isin(groups.index)]
    originals = df[df["key"].isin(groups.index)]
    need_bytes = pd.concat([top, bottom, originals[originals["status"] == reasons.KEPT]]).drop_duplicates("key")
    images = {k: pages.thumbnail_uri(b) for k, b in read_images(curdir, need_bytes).items()}
    images.update(read_thumbs(curdir, set(shown_rejected["key"]) | set(dup_rows["key"])
                   | set(originals["key"][originals["status"] != reasons.KEPT])))

    def tiles(rows):
        return [pages.tile(images.get(r["key"]), _tile_lines(r), r["key"]) for _, r in rows.iterrows()]

    out = ["<h2>Kept images</h2>"]
    if len(scored):
        out.append(pages.gallery("kept-top", "Highest aesthetic score", tiles(top), len(scored)))
        out.append(pages.gallery("kept-bottom", "Lowest aesthetic score", tiles(bottom), len(scored)))
    else:
        out.append(pages.gallery("kept", "Kept", tiles(kept.head(GALLERY)), len(kept)))
    out.append("<h2>Rejected images by reason</h2>")
    if not len(rejected):
        out.append("<p>None.</p>")
    for reason, n in rejected["reason"].value_counts().items():
        rows = shown_rejected[shown_rejected["reason"] == reason]
        out.append(pages.gallery(f"rejected-{reason}", reason, tiles(rows), int(n),
                                note="thumbnails: CURDIR/thumbs/ (a sample per reason)"))
    out.append("<h2>Duplicate groups</h2>")
    if not len(groups):
        out.append("<p>None.</p>")
    for original, n in groups.items():
        head = originals[originals["key"] == original].head(1)
        members = tiles(head) if len(head) else [pages.tile(None, [original, "(not in manifest)"], original)]
        members += tiles(dup_rows[dup_rows["dup_of"] == original].head(GALLERY))
        out.append(f'<div class="group" data-group="{pages.esc(original)}" data-count="{len(members)}">'
                   f'{"".join(members)}</div>')
    failed = df[df["status"] == reasons.FAILED]
    if len(failed):
        rows = [(r, int(n), " ".join(failed[failed["reason"] == r]["url"].head(FAILED_EXAMPLES)))
                for r, n in failed["reason"].value_counts().items()]
        out.append("<h2>Failed (no image)</h2>" + pages.table(["reason", "images", "example URLs"], rows, "failed"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------


def build(curdir: str | Path, cur: CurationConfig | None = None) -> str:
    """The report's HTML for a curated run folder."""
    curdir = Path(curdir)
    cur = cur or CurationConfig()
    df = read_manifest(curdir)
    stats_file = curdir / STATS
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else {}
    body = [f'<p class="muted">{pages.esc(curdir.resolve())}: {len(df):,} URLs</p>',
            _counts(df, stats), _thresholds(cur), _histograms(df, cur), _galleries(curdir, df)]
    return pages.page(f"Dataset report: {curdir.name}", "\n".join(body))


def write_report(curdir: str | Path, cur: CurationConfig | None = None) -> Path:
    """Write CURDIR/report.html atomically; returns its path."""
    out = Path(curdir) / REPORT
    atomic.write_text(out, build(curdir, cur))
    return out


def main(argv: list[str] | None = None) -> None:
    from common import cli

    p = cli.parser("curation/report",
                   "Write DIR/report.html for a curated run: counts, histograms with thresholds, galleries. "
                   "Pass the same --profile/--set as the run so the thresholds drawn are the ones used.",
                   "curation/report demo-out/curated --profile demo")
    p.add_argument("dir", help="CURDIR: a curated run folder (manifest.parquet, shards/, stats.json)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    curdir = Path(args.dir)
    if not (curdir / format.MANIFEST).is_file():
        cli.fail(f"{curdir}: no {format.MANIFEST} (is this a curated run folder?)")
    if args.dry_run:
        cli.print_plan({"curdir": str(curdir), "manifest": str(curdir / format.MANIFEST),
                        "shards": len(list((curdir / "shards").glob("*.tar"))),
                        "thumbs": str(curdir / THUMBS), "out": str(curdir / REPORT),
                        "thresholds": to_dict(cfg)["curation"]})
        return
    print(write_report(curdir, cfg.curation))
