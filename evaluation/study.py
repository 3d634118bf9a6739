"""One picture of a preference study, like PixArt-Σ's Fig. 9: per run, the human win rate, each
judge's win rates (quality, prompt alignment) with 95% Wilson intervals; plus judge–human agreement
(Cohen's κ) and the judge's position bias, so a reader knows how far to trust the judge.

Everything is read from EVALDIR's votes table (preference.sqlite: humans and judges); the scores
and FID are evaluation/results.py's. The results page (evaluation/serve.py) shows `section`; `write_summary`
puts the same numbers into summary.md.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from evaluation import stats
from evaluation.store import DB, JUDGE_QUESTIONS, Store, load_pairs

SUMMARY_MARK = "## Preference study"
CHART_W, LABEL_W, BAR_H, GAP = 720, 170, 14, 10
COLOURS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]


def collect(evaldir: str | Path) -> dict:
    """The study's numbers from EVALDIR (votes on the images now there only)."""
    evaldir = Path(evaldir)
    store = Store(evaldir / DB)
    pairs = {p.id: p for p in load_pairs(evaldir, store.salt)}
    rows = store.rows(pairs.keys())
    runs = sorted({r for p in pairs.values() for r in (p.run_a, p.run_b)})
    series = [{"name": "human", "source": "human", "question": "overall", "runs": _per_run(store.votes(pairs.keys()))}]
    judges = []
    for rater in sorted({r["rater"] for r in rows if r["source"] == "judge"}):
        mine = [r for r in rows if r["rater"] == rater]
        for q in JUDGE_QUESTIONS:
            votes = [
                (r["run_a"], r["run_b"], r["winner"]) for r in mine if r["question"] == q and r["choice"] != "invalid"
            ]
            series.append({"name": f"{rater} · {q}", "source": "judge", "question": q, "runs": _per_run(votes)})
        human = [r for r in rows if r["source"] == "human"]
        judges.append(
            {
                "judge": rater,
                "bias": stats.position_bias(mine),
                "agreement": stats.agreement(human + mine, pairs, JUDGE_QUESTIONS),
            }
        )
    return {"runs": runs, "pairs": len(pairs), "series": series, "judges": judges}


def _per_run(votes) -> dict:
    return {r["run"]: r for r in stats.win_rates(votes)["runs"]}


# ---------------------------------------------------------------------------------------------
# The page section: an inline SVG chart and three small tables (no external assets)
# ---------------------------------------------------------------------------------------------


def chart_svg(data: dict) -> str:
    """Horizontal bars per run and series (win rate), whiskers for the interval, a line at 50%."""
    series, runs = data["series"], data["runs"]
    group = len(series) * (BAR_H + 2) + GAP
    height = 30 + group * len(runs) + 20 * math.ceil(len(series) / 2) + 10
    x = lambda v: LABEL_W + v * (CHART_W - LABEL_W - 20)
    parts = [
        f"<svg id='winrate-chart' xmlns='http://www.w3.org/2000/svg' width='{CHART_W}' height='{height}' "
        f"role='img' aria-label='win rate per run'>",
        *[
            f"<line x1='{x(t):.1f}' x2='{x(t):.1f}' y1='20' y2='{20 + group * len(runs)}' stroke='#ddd'/>"
            f"<text x='{x(t):.1f}' y='14' font-size='10' text-anchor='middle'>{int(t * 100)}%</text>"
            for t in (0, 0.25, 0.75, 1)
        ],
        f"<line x1='{x(0.5):.1f}' x2='{x(0.5):.1f}' y1='20' y2='{20 + group * len(runs)}' stroke='#888' "
        f"stroke-dasharray='4 3'/><text x='{x(0.5):.1f}' y='14' font-size='10' text-anchor='middle'>50%</text>",
    ]
    for i, run in enumerate(runs):
        top = 24 + i * group
        parts.append(
            f"<text x='{LABEL_W - 8}' y='{top + group / 2 - 2:.0f}' font-size='12' text-anchor='end'>"
            f"{html.escape(run)}</text>"
        )
        for j, s in enumerate(series):
            y, colour, r = top + j * (BAR_H + 2), COLOURS[j % len(COLOURS)], s["runs"].get(run)
            if r is None:  # no vote of this series on this run yet
                parts.append(
                    f"<text class='no-votes' x='{x(0) + 4:.1f}' y='{y + BAR_H - 3}' font-size='10' "
                    f"fill='#999'>no votes</text>"
                )
                continue
            parts.append(
                f"<rect class='bar' data-run='{html.escape(run)}' data-series='{html.escape(s['name'])}' "
                f"data-source='{s['source']}' data-question='{s['question']}' data-rate='{r['rate']:.6f}' "
                f"data-lo='{r['lo']:.6f}' data-hi='{r['hi']:.6f}' data-n='{r['n']}' x='{x(0):.1f}' y='{y}' "
                f"width='{max(x(r['rate']) - x(0), 1):.1f}' height='{BAR_H}' fill='{colour}'>"
                f"<title>{html.escape(s['name'])}: {100 * r['rate']:.1f}% [{100 * r['lo']:.1f}, "
                f"{100 * r['hi']:.1f}] over {r['n']} votes</title></rect>"
                f"<line x1='{x(r['lo']):.1f}' x2='{x(r['hi']):.1f}' y1='{y + BAR_H / 2}' y2='{y + BAR_H / 2}' "
                f"stroke='#222'/>"
            )
    legend_top = 30 + group * len(runs)
    for j, s in enumerate(series):
        lx, ly = 10 + (j % 2) * (CHART_W // 2), legend_top + (j // 2) * 20
        parts.append(
            f"<rect x='{lx}' y='{ly}' width='12' height='12' fill='{COLOURS[j % len(COLOURS)]}'/>"
            f"<text x='{lx + 18}' y='{ly + 10}' font-size='11'>{html.escape(s['name'])}</text>"
        )
    return "".join(parts) + "</svg>"


def section(data: dict) -> str:
    """The study part of the results page."""
    judge_rows = "".join(
        f"<tr class='judge-row' data-judge='{html.escape(j['judge'])}'><td>{html.escape(j['judge'])}</td>"
        f"<td>{j['bias']['answers']}</td><td>{j['bias']['invalid']}</td><td>{_pct(j['bias']['first'])}</td>"
        f"<td>{_pct(j['bias']['second'])}</td><td>{_pct(j['bias']['tie'])}</td><td>{_pct(j['bias']['consistent'])}</td>"
        + "".join(f"<td data-kappa='{q}' data-n='{a['n']}'>{_kappa(a)}</td>" for q, a in j["agreement"].items())
        + "</tr>"
        for j in data["judges"]
    )
    questions = "".join(f"<th>κ vs humans, {q}</th>" for q in JUDGE_QUESTIONS)
    return (
        "<h2>Preference study</h2><p class='muted'>Per run, its win rate against all other runs (a tie counts "
        "half; 95% Wilson interval) from human votes and from each VLM judge, which answers quality and prompt "
        "alignment separately, every pair in both orders (invalid answers left out).</p>"
        f"{chart_svg(data)}"
        "<h3>Judges</h3><p class='muted'>Position bias: how often the judge chose the first image, the second "
        "or a tie, and how often its two orders agreed. κ: Cohen's kappa between the judge's verdict (the same "
        "winner in both orders, else a tie) and the human majority, on the pairs both judged.</p>"
        f"<table id='judges'><tr><th>judge</th><th>answers</th><th>invalid</th><th>first</th><th>second</th>"
        f"<th>tie</th><th>orders agree</th>{questions}</tr>{judge_rows}</table>"
    )


def _pct(x: float) -> str:
    return "-" if math.isnan(x) else f"{100 * x:.1f}%"


def _kappa(a: dict) -> str:
    return "-" if math.isnan(a["kappa"]) else f"{a['kappa']:.2f} (n={a['n']})"


# ---------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------


def markdown(data: dict) -> str:
    pct = lambda r: f"{100 * r['rate']:.1f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}] (n={r['n']})" if r else "-"
    lines = [
        SUMMARY_MARK,
        "",
        "Win rate against all other runs (tie = half; 95% Wilson interval).",
        "",
        "| run | " + " | ".join(s["name"] for s in data["series"]) + " |",
        "| --- |" + " --- |" * len(data["series"]),
    ]
    lines += [
        f"| {run} | " + " | ".join(pct(s["runs"].get(run)) for s in data["series"]) + " |" for run in data["runs"]
    ]
    if data["judges"]:
        lines += [
            "",
            "| judge | answers | invalid | first | second | tie | orders agree | "
            + " | ".join(f"κ vs humans, {q}" for q in JUDGE_QUESTIONS)
            + " |",
            "| --- |" + " ---: |" * (6 + len(JUDGE_QUESTIONS)),
        ]
        lines += [
            f"| {j['judge']} | {j['bias']['answers']} | {j['bias']['invalid']} | {_pct(j['bias']['first'])} | "
            f"{_pct(j['bias']['second'])} | {_pct(j['bias']['tie'])} | {_pct(j['bias']['consistent'])} | "
            + " | ".join(_kappa(a) for a in j["agreement"].values())
            + " |"
            for j in data["judges"]
        ]
    return "\n".join(lines) + "\n"


def write_summary(evaldir: str | Path) -> Path:
    """summary.md with its preference part replaced by the current votes (the scores part kept)."""
    from shards.atomic import write_text

    path = Path(evaldir) / "summary.md"
    old = path.read_text() if path.exists() else "# Evaluation summary\n"
    head = old.split("\n" + SUMMARY_MARK)[0].rstrip("\n") + "\n\n"
    write_text(path, head + markdown(collect(evaldir)))
    return path
