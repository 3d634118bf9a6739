"""The field's numbers for an evaluation folder: per model (and per prompt category) every score's
mean with a 95% bootstrap interval and the FID against the reference set; EVALDIR/metrics.json,
its markdown table for summary.md and its section of the results page (table + inline SVG plot).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from evaluation import stats
from evaluation.scores import score_columns

METRICS = "metrics.json"
CHART_W, LABEL_W, ROW_H = 720, 170, 18
COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def collect(
    df, runs: list[str], fid: dict | None = None, records: dict | None = None, reference: dict | None = None
) -> dict:
    """metrics.json's content. `df`: scores.parquet's table; `fid`: {(run, category or None): result}."""
    fid = fid or {}

    def cell(d, run, category):
        out = {}
        for col in score_columns(df):
            values = d[col].dropna()
            lo, hi = stats.bootstrap_ci(values)
            out[col] = {
                "mean": float(values.mean()) if len(values) else float("nan"),
                "lo": lo,
                "hi": hi,
                "n": len(values),
            }
        if (run, category) in fid:
            out["fid"] = fid[run, category]
        return out

    overall = {run: cell(df[df.run == run], run, None) for run in runs}
    categories = {}
    if "category" in df.columns and df.category.notna().any():
        for cat in sorted(df.category.dropna().unique()):
            categories[cat] = {run: cell(df[(df.run == run) & (df.category == cat)], run, cat) for run in runs}
    return {"runs": runs, "overall": overall, "categories": categories, "models": records or {}, "reference": reference}


def strict(value):
    """`value` with every NaN or infinite float as None: strict JSON (`JSON.parse` and `jq` refuse NaN),
    null where a number is undefined (a set too small for an interval or an FID)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value) -> str:
    """Strict JSON (see `strict`): what metrics.json and the results page's JSON hold."""
    return json.dumps(strict(value), indent=1, allow_nan=False)


def write(evaldir: str | Path, metrics: dict) -> Path:
    from shards.atomic import write_text

    path = Path(evaldir) / METRICS
    write_text(path, dumps(metrics) + "\n")
    return path


def read(evaldir: str | Path) -> dict | None:
    path = Path(evaldir) / METRICS
    return json.loads(path.read_text()) if path.exists() else None


def _columns(metrics: dict) -> list[str]:
    cols = []
    for v in metrics["overall"].values():
        cols += [c for c in v if c not in cols]
    return cols


def fmt(v: dict | None, key: str = "mean") -> str:
    """`mean [lo, hi]` (or `fid [lo, hi]`), "-" where undefined; an FID on too few images says `biased`."""
    if not v or _missing(v.get(key)):
        return "-"
    lo, hi = v.get("lo"), v.get("hi")
    interval = "" if _missing(lo) or _missing(hi) else f" [{lo:.3f}, {hi:.3f}]"
    return f"{v[key]:.3f}{interval}" + (" (biased)" if v.get("biased") else "")


def caveats(metrics: dict) -> list[str]:
    """Why the FIDs are not comparable with published ones: another Inception file, too few images."""
    ref = metrics.get("reference") or {}
    out = [f"FID {ref['note']}"] if ref.get("note") else []
    fids = [v["fid"] for v in metrics["overall"].values() if "fid" in v]
    if any(f.get("biased") for f in fids):
        least = min(min(f["n"], f["n_reference"]) for f in fids)
        out.append(
            f"FID biased: {least:,} images where published FIDs use at least {ref.get('min_images', 10_000):,} "
            "(it falls as the set grows)"
        )
    return out


def markdown(metrics: dict) -> str:
    """Per model, then per category x model: every score and FID with its interval."""
    cols = _columns(metrics)
    head = "| model | " + " | ".join(cols) + " |\n| --- |" + " --- |" * len(cols)
    lines = [
        "## Metrics",
        "",
        "Mean and 95% bootstrap interval over the images (FID: the point value on all "
        "images, interval (with --fid-resamples) over resamples of the generated images).",
        "",
        *[f"**{c}**" for c in caveats(metrics)],
        *([""] if caveats(metrics) else []),
        head,
    ]
    lines += [
        f"| {run} | " + " | ".join(fmt(v.get(c), "fid" if c == "fid" else "mean") for c in cols) + " |"
        for run, v in metrics["overall"].items()
    ]
    if metrics["categories"]:
        lines += [
            "",
            "Per prompt category.",
            "",
            "| category | model | " + " | ".join(cols) + " |",
            "| --- | --- |" + " --- |" * len(cols),
        ]
        for cat, per_run in metrics["categories"].items():
            lines += [
                f"| {cat} | {run} | " + " | ".join(fmt(v.get(c), "fid" if c == "fid" else "mean") for c in cols) + " |"
                for run, v in per_run.items()
            ]
    return "\n".join(lines) + "\n"


def chart_svg(metrics: dict, col: str) -> str:
    """One score per model: a dot at the mean, a whisker for the interval, one row per model."""
    key = "fid" if col == "fid" else "mean"
    rows = [(run, v[col]) for run, v in metrics["overall"].items() if col in v and not _missing(v[col][key])]
    if not rows:
        return ""
    values = [x for _, r in rows for x in (r[key], r.get("lo"), r.get("hi")) if x is not None and not _missing(x)]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    x = lambda v: LABEL_W + (v - lo) / (hi - lo) * (CHART_W - LABEL_W - 20)
    height = 30 + ROW_H * len(rows)
    parts = [
        f"<svg class='metric-chart' data-metric='{col}' xmlns='http://www.w3.org/2000/svg' width='{CHART_W}' "
        f"height='{height}' role='img' aria-label='{col} per model'>"
        f"<text x='{LABEL_W}' y='12' font-size='11'>{html.escape(col)} ({lo:.3g} – {hi:.3g})</text>"
    ]
    for i, (run, r) in enumerate(rows):
        y = 28 + i * ROW_H
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f"<text x='{LABEL_W - 8}' y='{y + 4}' font-size='12' text-anchor='end'>{html.escape(run)}</text>")
        if not _missing(r.get("lo")):
            parts.append(f"<line x1='{x(r['lo']):.1f}' x2='{x(r['hi']):.1f}' y1='{y}' y2='{y}' stroke='#222'/>")
        parts.append(
            f"<circle class='point' data-run='{html.escape(run)}' data-value='{r[key]:.6f}' "
            f"cx='{x(r[key]):.1f}' cy='{y}' r='5' fill='{colour}'><title>{html.escape(run)}: "
            f"{fmt(r, key)}</title></circle>"
        )
    return "".join(parts) + "</svg>"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def section(metrics: dict | None) -> str:
    """The metrics part of the results page ('' before evaluation/evaluate has run)."""
    if not metrics:
        return ""
    cols = _columns(metrics)
    th = "".join(f"<th>{html.escape(c)}</th>" for c in cols)

    def row(run, v, cat=None):
        first = f"<td>{html.escape(cat)}</td>" if cat is not None else ""
        return (
            f"<tr class='metric-row' data-run='{html.escape(run)}'"
            + (f" data-category='{html.escape(cat)}'" if cat is not None else "")
            + f">{first}<td>{html.escape(run)}</td>"
            + "".join(f"<td data-metric='{c}'>{fmt(v.get(c), 'fid' if c == 'fid' else 'mean')}</td>" for c in cols)
            + "</tr>"
        )

    body = "".join(row(run, v) for run, v in metrics["overall"].items())
    per_cat = "".join(row(run, v, cat) for cat, per_run in metrics["categories"].items() for run, v in per_run.items())
    ref = metrics.get("reference")
    ref_text = (
        f"FID against {html.escape(str(ref['path']))} ({ref['n']} images, Inception pool features {ref['features']})."
        if ref
        else "No reference set given: no FID (evaluation/evaluate --reference)."
    )
    warnings = "".join(f"<p class='caveat'><b>{html.escape(c)}</b></p>" for c in caveats(metrics))
    return (
        "<h2>Metrics</h2><p class='muted'>Mean and 95% bootstrap interval over the images; FID: the value on "
        f"all images, interval (with --fid-resamples) over resamples of the generated images. {ref_text}</p>{warnings}"
        f"<table id='metrics'><tr><th>model</th>{th}</tr>{body}</table>"
        + "".join(chart_svg(metrics, c) for c in cols)
        + (
            f"<h3>Per category</h3><table id='metrics-by-category'><tr><th>category</th><th>model</th>{th}</tr>"
            f"{per_cat}</table>"
            if per_cat
            else ""
        )
    )
