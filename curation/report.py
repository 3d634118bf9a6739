"""The dataset report: one self-contained HTML page per curated run, `CURDIR/report.html`.

People look at pictures and plots before they trust a threshold, so the page shows counts by
status and reason, histograms of every quantity a threshold acts on (with the configured
threshold drawn), and galleries: kept images with the highest and lowest aesthetic scores,
rejected images per reason, and duplicate groups side by side. Plots and thumbnails are embedded
as data URIs (common/pages.py), so the file opens from disk with no server.

Kept images are read from the curated shards. Rejected images are not in the shards: their
thumbnails come from `CURDIR/thumbs/KEY.jpg`, which curation writes with `save_thumbnail` for a
bounded sample of each reason (`THUMBS_PER_REASON`); a rejected row without one gets a text tile.
Reads only what it shows: the manifest streamed in batches (`scan`), each section reading its own
few columns into bounded aggregates (counters, fixed bins, GALLERY rows per gallery), so memory
does not grow with the run (10^7-10^8 URLs); and the gallery images' tar members. CURDIR is a folder
or a bucket prefix (shards/storage.py). Over 400 lines
because each section's streaming aggregate sits beside the HTML it feeds; split, they would be read
apart.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from common import pages
from common.config import CurationConfig, to_dict
from shards import atomic, buckets, format, reasons, storage
from shards.errors import SigmaError
from shards.storage import Loc

Dir = str | Path | Loc

REPORT = "report.html"
STATS = "stats.json"
THUMBS = "thumbs"  # CURDIR/thumbs/KEY.jpg: thumbnails of rejected images (kept ones are in the shards)
THUMBS_PER_REASON = 24  # what curation should save per reason and download shard; the report shows up to this
GALLERY = 24  # tiles per gallery
DUP_GROUPS = 12  # duplicate groups shown, largest first
FAILED_EXAMPLES = 5  # example URLs per failure reason

NUMERIC = ["width", "height", "aesthetic", "sharpness", "contrast", "brightness", "nsfw", "watermark"]
TEXT = ["status", "reason", "tier", "dup_of", "key", "url"]  # null reads as ""
BATCH = 65_536  # manifest rows per batch: a few MB of the columns a section reads


# ---------------------------------------------------------------------------------------------
# Thumbnails of rejected images (written by curation, read here)
# ---------------------------------------------------------------------------------------------


def _loc(curdir: Dir) -> Loc:
    return curdir if isinstance(curdir, Loc) else storage.resolve(curdir)


def thumb_path(curdir: Dir, key: str) -> Loc:
    return _loc(curdir) / THUMBS / f"{key}.jpg"


def save_thumbnail(curdir: Dir, key: str, data: bytes, side: int = 256) -> bool:
    """Write CURDIR/thumbs/KEY.jpg (longest side `side`) from encoded bytes; False if undecodable."""
    import base64

    uri = pages.thumbnail_uri(data, side)
    if uri is None:
        return False
    atomic.write_bytes(thumb_path(curdir, key), base64.b64decode(uri.split(",", 1)[1]))
    return True


def save_rejected_thumbnails(curdir: Dir, rows, per_reason: int = THUMBS_PER_REASON, options: Any = None) -> int:
    """Thumbnails for up to `per_reason` rejected rows per reason, read from their download tars.

    rows: dicts with key, reason, src, offset, size (the image bytes' place in a download tar,
    as curation records them). Call once per download shard, before the download tars are
    deleted. Rows without bytes (src "") and existing thumbnails (by exact name) are skipped; returns
    how many were written. `options`: the `storage` config section the `src` are read with.
    """
    taken: dict[str, int] = defaultdict(int)
    todo = []
    for row in rows:
        reason = row.get("reason")
        if not reason or not row.get("src") or taken[reason] >= per_reason:
            continue
        taken[reason] += 1
        if not thumb_path(curdir, row["key"]).has_file():
            todo.append(row)

    todo.sort(key=lambda r: (r["src"], r["offset"]))  # the threads read neighbours: one span at a time
    src = {r["src"]: storage.resolve(r["src"], options) for r in todo}
    reader = storage.RangeReader((src[r["src"]], r["offset"], r["size"]) for r in todo)  # a bucket: few GETs

    def save(row) -> bool:  # each thread holds one image's bytes at a time
        return save_thumbnail(curdir, row["key"], reader.read(src[row["src"]], row["offset"], row["size"]))

    return sum(pages.in_threads(save, todo))


# ---------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------


def manifest_file(curdir: Dir):
    """CURDIR/manifest.parquet opened for streaming (footer read, no rows)."""
    path = _loc(curdir) / format.MANIFEST
    if not path.has_file():
        raise SigmaError(f"{path}: no manifest (is this a curated run folder?)")
    return storage.parquet_file(path)


def on_disk(curdir: Dir) -> bool:
    """Whether the run read images on disk (--images: its manifest names each item's `source`)."""
    with manifest_file(curdir) as f:
        return "source" in f.schema_arrow.names


def scan(curdir: Dir, columns: list[str]):
    """The manifest in DataFrames of BATCH rows holding only `columns`, numeric ones coerced, text
    ones "" for null, missing ones null; indexed by row number, so ties break by manifest order.

    A section holds one batch and its own bounded aggregates: never the whole manifest (at 3·10^7
    URLs its own columns alone are several GB in pandas).
    """
    import pandas as pd

    with manifest_file(curdir) as f:
        present = [c for c in columns if c in f.schema_arrow.names]  # an older manifest may lack some
        start = 0
        for batch in f.iter_batches(batch_size=BATCH, columns=present):
            df = batch.to_pandas()
            df.index = pd.RangeIndex(start, start + len(df))
            start += len(df)
            for col in columns:
                if col not in df:
                    df[col] = None
                if col in NUMERIC:
                    df[col] = pd.to_numeric(df[col], errors="coerce")
                elif col in TEXT:
                    df[col] = df[col].fillna("").astype(str)
            yield df


def shard_path(curdir: Dir, value) -> Loc | None:
    """The tar a manifest `shard` value names: an index (3, "00003") or a file name/path."""
    curdir = _loc(curdir)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return None
    if isinstance(value, (int, float)) or str(value).isdigit():
        return curdir / "shards" / format.shard_name(int(value))
    text = str(value)
    if os.path.isabs(text):
        return storage.resolve(text)
    return curdir / text if (curdir / text).has_file() else curdir / "shards" / text.rsplit("/", 1)[-1]


def read_images(curdir: Dir, rows) -> dict[str, bytes]:
    """{key: original bytes} for the given kept rows, reading only their tars' image members."""
    curdir = _loc(curdir)
    wanted: dict[Loc | None, set[str]] = defaultdict(set)
    for key, shard in zip(rows["key"], rows["shard"]):
        wanted[shard_path(curdir, shard)].add(key)
    if None in wanted:  # no shard recorded: look in every shard
        lost = wanted.pop(None)
        for p in (curdir / "shards").glob("*.tar"):
            wanted[p] |= lost
    found: dict[str, bytes] = {}
    for path, keys in wanted.items():
        if path is not None and keys - set(found) and path.has_file():
            found.update(pages.tar_images(path, keys - set(found)))
    return found


def thumb_keys(curdir: Dir) -> set[str]:
    """Keys that have a saved thumbnail (one listing, not a request per manifest row)."""
    return {p.name[:-4] for p in (_loc(curdir) / THUMBS).iterdir() if p.name.endswith(".jpg")}


def read_thumbs(curdir: Dir, keys) -> dict[str, str]:
    """{key: data URI} for the rejected keys that have a saved thumbnail."""
    out = {}
    for key in keys:
        p = thumb_path(curdir, key)
        if p.has_file():
            out[key] = pages.data_uri(p.read_bytes(), "image/jpeg")
    return out


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _largest(counts: dict) -> list[tuple]:
    """(value, count) pairs, largest count first, ties as pandas orders them when it sorts the same
    counts (`value_counts`, `groupby().size().sort_values`): the order the page always had."""
    import pandas as pd

    if not counts:
        return []
    ordered = pd.Series(list(counts.values()), index=list(counts), dtype="int64").sort_values(ascending=False)
    return [(k, int(n)) for k, n in zip(ordered.index, ordered)]


def _counts(curdir: Path, total: int, stats: dict) -> str:
    by_status, detail = Counter(), Counter()
    for b in scan(curdir, ["status", "reason"]):
        by_status.update(b["status"].value_counts().to_dict())
        detail.update(b[b["status"] != reasons.KEPT].groupby(["status", "reason"]).size().to_dict())
    rows = [(s, int(by_status[s]), f"{100 * by_status[s] / max(total, 1):.1f}%") for s in reasons.STATUSES]
    out = ["<h2>Counts</h2>", pages.table(["status", "images", "share"], rows + [("total", total, "100%")], "status")]
    out.append(
        pages.table(
            ["status", "reason", "images"],
            [(s, r or "(none)", n) for (s, r), n in _largest(dict(sorted(detail.items())))],
            "reason",
        )
    )
    if stats:
        out.append(
            f"<details><summary>stats.json</summary><pre>{pages.esc(json.dumps(stats, indent=2))}</pre></details>"
        )
    return "\n".join(out)


def _thresholds(cur: CurationConfig) -> str:
    q, d = cur.quality, cur.download
    rows = [
        ("min_tier", cur.min_tier),
        ("quality", "on" if q.enabled else "off"),
        ("quality.min_sharpness", q.min_sharpness),
        ("quality.min_contrast", q.min_contrast),
        ("quality.min_brightness", q.min_brightness),
        ("quality.max_brightness", q.max_brightness),
        ("aesthetic.threshold", f"{cur.aesthetic.threshold:g} ({'on' if cur.aesthetic.enabled else 'off'})"),
        ("nsfw.threshold", f"{cur.nsfw.threshold:g} ({'on' if cur.nsfw.enabled else 'off'})"),
        ("watermark.threshold", f"{cur.watermark.threshold:g} ({'on' if cur.watermark.enabled else 'off'})"),
        ("dedup.phash_radius", cur.dedup.phash_radius if cur.dedup.enabled else "off"),
        (
            "dedup.clip_similarity",
            cur.dedup.clip_similarity if cur.dedup.enabled and cur.dedup.clip_similarity is not None else "off",
        ),
        ("download.allow_networks", ", ".join(d.allow_networks) or "none: global addresses only"),
        ("download.max_bytes", f"{d.max_bytes:,}"),
        ("download.max_seconds", f"{d.max_seconds:g}"),
        ("download.robots_txt", "on" if d.robots_txt else "off"),
    ]
    return "<h2>Thresholds</h2>" + pages.table(["setting", "value"], rows, "thresholds")


def _on(label: str, enabled: bool) -> str:
    return label if enabled else f"{label} (off)"


def _decoded(curdir: Path, columns: list[str]):
    """Batches of the decoded images (width and height > 0), with their aspect ratio."""
    for b in scan(curdir, ["width", "height", *columns]):
        d = b[(b["width"] > 0) & (b["height"] > 0)]
        yield d.assign(aspect=d["height"] / d["width"])


def _quantities(cur: CurationConfig) -> tuple[list, list]:
    """(shape, scores): (column, title, x label, threshold lines, log x) of each histogram."""
    side = int(buckets.TIER_TABLES[cur.min_tier])
    q = cur.quality
    shape = [
        ("width", "Width", "pixels", [(f"{cur.min_tier} side", side)], False),
        ("height", "Height", "pixels", [(f"{cur.min_tier} side", side)], False),
        (
            "aspect",
            "Aspect ratio",
            "height / width",
            [("min bucket", buckets.MIN_ASPECT), ("max bucket", buckets.MAX_ASPECT)],
            True,
        ),
    ]
    scores = [
        (
            "aesthetic",
            "Aesthetic score",
            "LAION aesthetic (1-10)",
            [(_on("threshold", cur.aesthetic.enabled), cur.aesthetic.threshold)],
            False,
        ),
        ("sharpness", "Sharpness", "variance of the Laplacian", [(_on("min", q.enabled), q.min_sharpness)], True),
        ("contrast", "Contrast", "std of grey levels", [(_on("min", q.enabled), q.min_contrast)], False),
        (
            "brightness",
            "Brightness",
            "mean grey level",
            [(_on("min", q.enabled), q.min_brightness), (_on("max", q.enabled), q.max_brightness)],
            False,
        ),
        ("nsfw", "NSFW probability", "punsafe", [(_on("threshold", cur.nsfw.enabled), cur.nsfw.threshold)], False),
        (
            "watermark",
            "Watermark probability",
            "pwatermark",
            [(_on("threshold", cur.watermark.enabled), cur.watermark.threshold)],
            False,
        ),
    ]
    return shape, scores


def _histograms(curdir: Path, cur: CurationConfig) -> str:
    """Every quantity a threshold acts on, over all decoded images, with the thresholds drawn.

    Two passes over the manifest: the first finds each quantity's range (and counts tiers), the
    second bins on the edges that range gives (pages.histogram_edges), so what is held is 40 bins
    per plot, not the values.
    """
    import numpy as np

    shape, scores = _quantities(cur)
    lo, hi, seen, tiers, decoded = {}, {}, set(), Counter(), 0
    for d in _decoded(curdir, ["tier", *(q[0] for q in scores)]):
        decoded += len(d)
        tiers.update(d["tier"].replace("", "below 1k").replace("None", "below 1k").value_counts().to_dict())
        for col, *_, log_x in shape + scores:
            seen |= {col} if d[col].notna().any() else set()  # nsfw / watermark are null when their filters never ran
            v = pages.finite(d[col], log_x)
            if len(v):
                lo[col], hi[col] = min(lo.get(col, np.inf), v.min()), max(hi.get(col, -np.inf), v.max())
    edges = {
        col: pages.histogram_edges(lo[col], hi[col], lines, log_x=log_x)
        for col, _, _, lines, log_x in shape + scores
        if col in lo
    }
    counts = {col: np.zeros(len(e) - 1, dtype=np.int64) for col, e in edges.items()}
    if edges:
        for d in _decoded(curdir, [q[0] for q in scores if q[0] in edges]):
            for col, *_, log_x in shape + scores:
                if col in edges:
                    counts[col] += np.histogram(pages.finite(d[col], log_x), edges[col])[0]

    def plot(col, title, xlabel, lines, log_x):
        return pages.histogram_counts(col, edges.get(col), counts.get(col), title, xlabel, lines, log_x)

    order = ["below 1k", *buckets.CURATION_TIERS]
    plots = [plot(*q) for q in shape]
    plots.append(pages.bars("tier", {t: int(tiers[t]) for t in order}, f"Tier (n={decoded:,})", marked=cur.min_tier))
    plots += [plot(*q) for q in scores if q[0] in seen]
    return (
        '<h2>Distributions</h2><p class="muted">All decoded images (kept and rejected); dashed lines: '
        'the configured thresholds.</p>\n<div class="plots">' + "".join(plots) + "</div>"
    )


def _tile_lines(row) -> list[str]:
    lines = [row["key"], f"{int(row['width'])}x{int(row['height'])}" if row["width"] > 0 else ""]
    if not math.isnan(row["aesthetic"]):
        lines.append(f"aesthetic {row['aesthetic']:.3g}")
    if row["reason"]:
        lines.append(row["reason"])
    if row["dup_of"]:
        lines.append(f"dup of {row['dup_of']}")
    return [x for x in lines if x]


GALLERY_COLUMNS = ["key", "status", "reason", "width", "height", "aesthetic", "dup_of", "shard"]


def _cat(*frames):
    """pandas.concat of the non-empty frames, in order; None when all are empty."""
    import pandas as pd

    frames = [f for f in frames if f is not None and len(f)]
    return pd.concat(frames) if frames else None


def _head(acc, rows, n: int):
    """The first n rows of acc followed by rows."""
    both = _cat(acc, rows)
    return None if both is None else both.head(n)


def _heads(acc, rows, by: str, n: int):
    """The first n rows per `by` value of acc followed by rows (acc: earlier batches' heads)."""
    both = _cat(acc, rows)
    return None if both is None else both.groupby(by, sort=False).head(n)


def _ranked(best, worst, rows):
    """Merge a batch into the GALLERY first and GALLERY last rows of the descending aesthetic
    order, ties in manifest order (what a stable sort of the whole manifest gives: best and worst
    come from earlier batches, so a stable sort of them followed by the batch keeps that order)."""

    def order(*frames):
        both = _cat(*frames)
        return None if both is None else both.sort_values("aesthetic", ascending=False, kind="stable")

    rows = order(rows)
    if rows is None:
        return best, worst
    return order(best, rows.head(GALLERY)).head(GALLERY), order(worst, rows.tail(GALLERY)).tail(GALLERY)


def _gallery_rows(curdir: Path, thumbs: set[str]) -> dict:
    """One pass for every gallery: bounded heads and counters, never the rejected or kept set.

    Holds GALLERY rows per gallery, per-reason counts, FAILED_EXAMPLES URLs per failure reason,
    and one counter entry per kept image that has duplicates (the duplicate groups' sizes).
    """
    g = {
        "best": None,
        "worst": None,
        "scored": 0,
        "kept": 0,
        "first_kept": None,
        "with_thumb": None,
        "without_thumb": None,
        "rejected": Counter(),
        "dups": Counter(),
        "failed": Counter(),
        "failed_urls": None,
    }
    for b in scan(curdir, [*GALLERY_COLUMNS, "url", "source"]):
        kept, rejected, failed = (b[b["status"] == s] for s in (reasons.KEPT, reasons.REJECTED, reasons.FAILED))
        scored = kept[kept["aesthetic"].notna()]
        g["kept"] += len(kept)
        g["scored"] += len(scored)
        g["first_kept"] = _head(g["first_kept"], kept, GALLERY)
        g["best"], g["worst"] = _ranked(g["best"], g["worst"], scored)
        have = rejected["key"].isin(thumbs)  # per reason, rows with a saved thumbnail first
        g["with_thumb"] = _heads(g["with_thumb"], rejected[have], "reason", GALLERY)
        g["without_thumb"] = _heads(g["without_thumb"], rejected[~have], "reason", GALLERY)
        g["rejected"].update(rejected["reason"].value_counts(sort=False).to_dict())  # first-seen order for ties
        g["dups"].update(rejected.loc[rejected["dup_of"] != "", "dup_of"].value_counts(sort=False).to_dict())
        g["failed"].update(failed["reason"].value_counts(sort=False).to_dict())
        source = failed["source"].fillna("")  # a URL run's manifest has no source column: null
        named = failed.assign(url=source.where(source != "", failed["url"]))  # on disk: the file
        g["failed_urls"] = _heads(g["failed_urls"], named[["reason", "url"]], "reason", FAILED_EXAMPLES)
    return g


def _group_rows(curdir: Path, shown: set[str]):
    """Second pass: the originals (first row per key) and first GALLERY members of the shown groups."""
    originals = members = None
    for b in scan(curdir, GALLERY_COLUMNS):
        originals = _heads(originals, b[b["key"].isin(shown)], "key", 1)
        dup = b[(b["status"] == reasons.REJECTED) & b["dup_of"].isin(shown)]
        members = _heads(members, dup, "dup_of", GALLERY)
    return originals, members


def _rows(frame, column: str | None = None, value=None) -> list:
    """A frame's rows as Series (optionally those with column == value); [] for None."""
    if frame is None:
        return []
    if column is not None:
        frame = frame[frame[column] == value]
    return [r for _, r in frame.iterrows()]


def _galleries(curdir: Path) -> str:
    g = _gallery_rows(curdir, thumb_keys(curdir))
    n = g["scored"]
    half = min(GALLERY, (n + 1) // 2)  # a small run: top and bottom never show the same image
    top = g["best"].head(half) if n else None
    bottom = g["worst"].tail(min(GALLERY, n - half)).iloc[::-1] if n else None
    groups = _largest(dict(sorted(g["dups"].items())))[:DUP_GROUPS]
    originals, members = _group_rows(curdir, {k for k, _ in groups}) if groups else (None, None)
    shown_rejected = None
    if g["with_thumb"] is not None or g["without_thumb"] is not None:
        shown_rejected = _heads(g["with_thumb"], g["without_thumb"], "reason", GALLERY)
    kept_originals = None if originals is None else originals[originals["status"] == reasons.KEPT]
    need_bytes = _cat(top, bottom, kept_originals)
    images = {}
    if need_bytes is not None:
        need_bytes = need_bytes.drop_duplicates("key")
        images = pages.thumbnail_uris(read_images(curdir, need_bytes))
    keys = [] if shown_rejected is None else list(shown_rejected["key"])
    keys += [] if members is None else list(members["key"])
    keys += [] if originals is None else list(originals["key"][originals["status"] != reasons.KEPT])
    images.update(read_thumbs(curdir, set(keys)))

    def tiles(rows):
        return [pages.tile(images.get(r["key"]), _tile_lines(r), r["key"]) for r in rows]

    out = ["<h2>Kept images</h2>"]
    if n:
        out.append(pages.gallery("kept-top", "Highest aesthetic score", tiles(_rows(top)), n))
        out.append(pages.gallery("kept-bottom", "Lowest aesthetic score", tiles(_rows(bottom)), n))
    else:
        out.append(pages.gallery("kept", "Kept", tiles(_rows(g["first_kept"])), g["kept"]))
    out.append("<h2>Rejected images by reason</h2>")
    if not g["rejected"]:
        out.append("<p>None.</p>")
    for reason, count in _largest(g["rejected"]):
        out.append(
            pages.gallery(
                f"rejected-{reason}",
                reason,
                tiles(_rows(shown_rejected, "reason", reason)),
                count,
                note="thumbnails: CURDIR/thumbs/ (a sample per reason)",
            )
        )
    out.append("<h2>Duplicate groups</h2>")
    if not groups:
        out.append("<p>None.</p>")
    for original, _ in groups:
        head = _rows(originals, "key", original)
        shown = tiles(head) if head else [pages.tile(None, [original, "(not in manifest)"], original)]
        shown += tiles(_rows(members, "dup_of", original))
        out.append(
            f'<div class="group" data-group="{pages.esc(original)}" data-count="{len(shown)}">{"".join(shown)}</div>'
        )
    if g["failed"]:
        urls = g["failed_urls"]
        rows = [(r, count, " ".join(urls["url"][urls["reason"] == r])) for r, count in _largest(g["failed"])]
        examples = "examples (file)" if on_disk(curdir) else "example URLs"
        out.append("<h2>Failed (no image)</h2>" + pages.table(["reason", "images", examples], rows, "failed"))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Page
# ---------------------------------------------------------------------------------------------


def build(curdir: Dir, cur: CurationConfig | None = None) -> str:
    """The report's HTML for a curated run folder."""
    curdir = _loc(curdir)
    cur = cur or CurationConfig()
    with manifest_file(curdir) as f:
        total = f.metadata.num_rows
    stats_file = curdir / STATS
    stats = json.loads(stats_file.read_text()) if stats_file.has_file() else {}
    where = curdir.local.resolve() if curdir.is_local else curdir.url
    body = [
        f'<p class="muted">{pages.esc(where)}: {total:,} {"images" if on_disk(curdir) else "URLs"}</p>',
        _counts(curdir, total, stats),
        _thresholds(cur),
        _histograms(curdir, cur),
        _galleries(curdir),
    ]
    return pages.page(f"Dataset report: {curdir.name}", "\n".join(body))


def write_report(curdir: Dir, cur: CurationConfig | None = None) -> Path | Loc:
    """Write CURDIR/report.html atomically; returns its path (a Loc in a bucket)."""
    out = _loc(curdir) / REPORT
    atomic.write_text(out, build(curdir, cur))
    return out.local if out.is_local else out


def main(argv: list[str] | None = None) -> None:
    from common import cli

    p = cli.parser(
        "curation/report",
        "Write DIR/report.html for a curated run: counts, histograms with thresholds, galleries. "
        "Pass the same --profile/--set as the run so the thresholds drawn are the ones used.",
        "curation/report demo-out/curated --profile demo",
    )
    p.add_argument("dir", help="CURDIR: a curated run folder or bucket prefix (manifest.parquet, shards/, stats.json)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    try:
        curdir = storage.resolve(args.dir, cfg.storage)
    except SigmaError as e:
        cli.fail(str(e))
    missing = (
        None
        if (curdir / format.MANIFEST).has_file()
        else f"{curdir}: no {format.MANIFEST} (is this a curated run folder?)"
    )
    if missing and not args.dry_run:
        cli.fail(missing)
    if missing:  # a dry run before curation has run: say so
        cli.unchecked(missing)
    if args.dry_run:
        cli.print_plan(
            {
                **({"not_checked": [missing]} if missing else {}),
                "curdir": str(curdir),
                "manifest": str(curdir / format.MANIFEST),
                "shards": len((curdir / "shards").glob("*.tar")),
                "thumbs": str(curdir / THUMBS),
                "out": str(curdir / REPORT),
                "thresholds": to_dict(cfg)["curation"],
            }
        )
        return
    print(write_report(curdir, cfg.curation))
