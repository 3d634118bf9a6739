"""The caption report: one self-contained HTML page per caption run, `CAPDIR/report.html`.

What a person checks before encoding: how long the new captions are (characters and T5 tokens,
with PixArt-Sigma's 300-token budget drawn), what share runs over the budget and will be
truncated at encode time, which rows failed and why, and examples side by side: the image, the
new caption and the original alt text. Images come from the curated shards when they are given
(`shards`); without them the examples are text only. The caption files, the shards and the report may
be on disk or in a bucket (shards/storage.py); the report is written as one object.
"""

from __future__ import annotations

from pathlib import Path

from common import pages
from shards import atomic, captions, format, reasons, storage

REPORT = "report.html"
EXAMPLES = 12  # spread over the token-length distribution, shortest to longest


def read_captions(capdir: captions.Place):
    """Every caption row as one DataFrame, with a `shard` column (the file stem). `capdir`: a recaption
    CAPDIR or a caption table from elsewhere (a file or folder, read by `shards.captions`)."""
    df = captions.read_table(captions.resolve(capdir)).rename(columns={"file": "shard"})
    for col in ("caption", "original_caption", "status", "reason", "captioner", "prompt"):
        df[col] = df[col].fillna("").astype(str)
    return df


def read_guard_examples(capdir: captions.Place) -> list[dict]:
    """What the model wrote for rows the caption-quality guard failed: [{shard, key, reason, text}]
    (recaption keeps up to 20 per shard in each parquet's metadata; captions files without it: none)."""
    import json

    import pyarrow.parquet as pq

    from captioning.guard import GUARD_EXAMPLES

    out = []
    for p in sorted(f for f in captions.resolve(capdir).files if f.suffix == ".parquet"):
        with captions.readable(p) as src:
            meta = pq.read_schema(src).metadata or {}
        out += [{"shard": p.stem, **e} for e in json.loads(meta.get(GUARD_EXAMPLES, b"[]"))]
    return out


def _guard_section(df, examples: list[dict]) -> list[str]:
    """Counts per guard reason and shard, and what the model wrote for some of those rows."""
    from captioning.guard import GUARD_REASONS

    guarded = df[df["reason"].isin(GUARD_REASONS)]
    if not len(guarded):
        return []
    counts = guarded.groupby(["shard", "reason"]).size().unstack(fill_value=0)
    reasons_seen = [r for r in GUARD_REASONS if r in counts.columns]
    body = [
        "<h2>Caption-quality guard</h2>",
        '<p class="muted">Generated, then failed by captioning/guard.py (rules in captioning/README.md); '
        "encode leaves these rows out.</p>",
        pages.table(
            ["shard", *reasons_seen, "rows"],
            [
                (stem, *(int(row[r]) for r in reasons_seen), int(row[reasons_seen].sum()))
                for stem, row in counts.iterrows()
            ],
            "guard-counts",
        ),
    ]
    per_reason: dict[str, list[dict]] = {}
    for e in examples:
        if len(per_reason.setdefault(e["reason"], [])) < 3:
            per_reason[e["reason"]].append(e)
    rows = [(e["reason"], e["key"], e["text"] or "(nothing)") for r in reasons_seen for e in per_reason.get(r, [])]
    if rows:
        body.append(pages.table(["reason", "key", "what the model wrote"], rows, "guard-examples"))
    return body


def _loc(p: captions.Place) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def _shard_paths(shards) -> dict[str, storage.Loc]:
    """{stem: tar} from a list of paths or Locs, or a brace pattern / glob / directory string."""
    if shards is None:
        return {}
    paths = format.shard_locs(str(shards)) if isinstance(shards, (str, Path)) else [_loc(s) for s in shards]
    return {p.name.split(".")[0]: p for p in paths}


def _examples(rows, shard_paths: dict[str, storage.Loc], budget: int) -> str:
    images: dict[str, bytes] = {}
    for stem, group in rows.groupby("shard"):
        if stem in shard_paths and shard_paths[stem].is_file():
            images.update(pages.tar_images(shard_paths[stem], set(group["key"])))
    uris = pages.thumbnail_uris(images)
    out = []
    for _, r in rows.iterrows():
        uri = uris.get(r["key"])
        over = " over" if r["num_tokens"] > budget else ""
        picture = f'<img alt="{pages.esc(r["key"])}" src="{uri}">' if uri else '<div class="muted">(no image)</div>'
        out.append(
            f'<div class="example" data-key="{pages.esc(r["key"])}"><div>{picture}</div><div class="text">'
            f'<b>{pages.esc(r["key"])}</b> <span class="tokens{over}">{int(r["num_tokens"])} T5 tokens, '
            f"{len(r['caption']):,} characters{' (over budget: truncated at encode)' if over else ''}</span>"
            f'<div class="caption new">{pages.esc(r["caption"])}</div>'
            f'<div class="caption original muted">alt text: {pages.esc(r["original_caption"]) or "(none)"}</div>'
            f"</div></div>"
        )
    return "".join(out)


def build(capdir: captions.Place, shards=None, token_budget: int = 300) -> str:
    """The report's HTML for a caption folder; `shards`: the curated shards it captioned (optional)."""
    import numpy as np

    capdir = _loc(capdir)
    df = read_captions(capdir)
    kept = df[df["status"] == reasons.KEPT]
    failed = df[df["status"] != reasons.KEPT]
    chars = kept["caption"].str.len()
    tokens = kept["num_tokens"].astype(int)
    over = int((tokens > token_budget).sum())
    share = f"{100 * over / max(len(kept), 1):.1f}%"
    summary = [
        ("caption files", int(df["shard"].nunique())),
        ("rows", len(df)),
        ("captions", len(kept)),
        ("failed", len(failed)),
        (f"over {token_budget} T5 tokens (truncated at encode)", over),
        ("share truncated", share),
        ("mean characters", f"{chars.mean():.0f}" if len(kept) else "-"),
        ("mean T5 tokens", f"{tokens.mean():.0f}" if len(kept) else "-"),
    ]
    body = [
        f'<p class="muted">{pages.esc(capdir.local.resolve() if capdir.is_local else capdir)}</p>',
        "<h2>Summary</h2>",
        pages.table(["", "value"], summary, "summary"),
        pages.table(
            ["captioner", "prompt", "rows"],
            [(c, p, int(n)) for (c, p), n in df.groupby(["captioner", "prompt"]).size().items()],
            "captioners",
        ),
    ]
    if len(failed):
        body.append(
            pages.table(
                ["status", "reason", "rows"],
                [(s, r, int(n)) for (s, r), n in failed.groupby(["status", "reason"]).size().items()],
                "failed",
            )
        )
    alt = kept["original_caption"].str.len()
    body += [
        "<h2>Lengths</h2>",
        '<div class="plots">',
        pages.histogram(
            "tokens", tokens, "New captions: T5 tokens", "T5 tokens (</s> included)", [("budget", token_budget)]
        ),
        pages.histogram(
            "chars",
            chars,
            "New captions: characters",
            "characters",
            [("mean", round(float(chars.mean())))] if len(kept) else [],
        ),
        pages.histogram("alt-chars", alt[alt > 0], "Original alt text: characters", "characters"),
        "</div>",
    ]
    # examples spread evenly over the token-length order, so short, typical and long ones all show
    ordered = kept.sort_values(["num_tokens", "key"], kind="stable")
    picks = (
        ordered.iloc[np.unique(np.linspace(0, len(ordered) - 1, min(EXAMPLES, len(ordered))).round().astype(int))]
        if len(ordered)
        else ordered
    )
    body += [
        f"<h2>Examples ({len(picks)} of {len(kept):,}, shortest to longest)</h2>",
        f'<section data-gallery="examples" data-count="{len(picks)}">'
        f"{_examples(picks, _shard_paths(shards), token_budget)}</section>",
    ]
    body += _guard_section(df, read_guard_examples(capdir))
    if len(failed):
        body += [
            "<h2>Failed rows</h2>",
            pages.table(
                ["key", "shard", "reason"],
                [(r["key"], r["shard"], r["reason"]) for _, r in failed.head(50).iterrows()],
                "failed-rows",
            ),
        ]
    return pages.page(f"Caption report: {capdir.name}", "\n".join(body))


def write_caption_report(capdir: captions.Place, shards=None, token_budget: int = 300) -> Path | storage.Loc:
    """Write CAPDIR/report.html (beside a single table file: FILE.report.html) atomically; returns its path
    (its Loc in a bucket). Called at the end of a recaption run."""
    loc = _loc(capdir)
    out = loc / REPORT if loc.is_dir() else loc.parent / f"{loc.stem}.report.html"
    atomic.write_text(out, build(loc, shards, token_budget))
    return out.local if out.is_local else out
