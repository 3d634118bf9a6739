"""The preference pages as HTML strings: the vote page (one prompt, two anonymised images, A / tie /
B) and the results page (win rates, then the study's and the metrics' sections). No external
assets: works offline. Served by evaluation/serve.py.
"""

from __future__ import annotations

import html

from evaluation.store import Pair, sides

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;padding:0 1em;color:#222}
.prompt{font-size:1.2em;margin:.6em 0 1em;padding:.6em .8em;background:#f3f3f3;border-radius:6px}
.pair{display:flex;gap:1em}.side{flex:1;text-align:center}.side h2{margin:.2em 0}
.side img{width:100%;max-height:65vh;object-fit:contain}
.votes{display:flex;gap:1em;justify-content:center;margin:1em 0}
button{font-size:1.1em;padding:.5em 2em;cursor:pointer}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:.3em .7em;text-align:right}td:first-child,th:first-child{text-align:left}
.muted{color:#777;font-size:.9em}"""

KEYS_JS = """document.addEventListener('keydown',e=>{const b={'ArrowLeft':'vote-A','1':'vote-A',
'ArrowDown':'vote-tie','2':'vote-tie','ArrowRight':'vote-B','3':'vote-B'}[e.key];
if(b){e.preventDefault();document.getElementById(b).click();}});"""


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"<title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>{body}</body></html>"
    )


def vote_page(pair: Pair | None, tokens: dict, salt: str, rater: str, judged: int, total: int) -> str:
    head = (
        f"<p class='muted'>rater <b id='rater'>{html.escape(rater)}</b> · judged "
        f"<span id='judged'>{judged}</span> of <span id='total'>{total}</span> · <a href='/results'>results</a></p>"
    )
    if pair is None:
        return _page("Preference: done", head + "<h1 id='done'>All pairs judged. Thank you.</h1>")
    left, right = sides(salt, rater, pair)
    body = (
        f"{head}<div class='prompt' id='prompt'>{html.escape(pair.prompt)}</div>"
        f"<div class='pair'><div class='side'><h2>A</h2><img id='img-A' alt='A' src='/image/{tokens[pair.id, left]}'>"
        f"</div><div class='side'><h2>B</h2><img id='img-B' alt='B' src='/image/{tokens[pair.id, right]}'></div></div>"
        f"<form method='post' action='/vote' class='votes'><input type='hidden' name='pair' value='{pair.id}'>"
        "<button id='vote-A' name='choice' value='A'>A is better</button>"
        "<button id='vote-tie' name='choice' value='tie'>Tie</button>"
        "<button id='vote-B' name='choice' value='B'>B is better</button></form>"
        "<p class='muted'>Keys: ← or 1 for A, ↓ or 2 for a tie, → or 3 for B.</p>"
        f"<script>{KEYS_JS}</script>"
    )
    return _page("Preference", body)


def results_page(rates: dict, sections: str = "") -> str:
    """Win rates per run pair and per run, then `sections` (the study's, the metrics')."""
    pct = lambda x: f"{100 * x:.1f}%"
    rows = "".join(
        f"<tr class='pair-row' data-run-a='{html.escape(t['run_a'])}' data-run-b='{html.escape(t['run_b'])}' "
        f"data-n='{t['n']}' data-wins-a='{t['wins_a']}' data-wins-b='{t['wins_b']}' data-ties='{t['ties']}' "
        f"data-rate-a='{t['rate_a']:.6f}'><td>{html.escape(t['run_a'])}</td><td>{html.escape(t['run_b'])}</td>"
        f"<td>{t['n']}</td><td>{t['wins_a']}</td><td>{t['wins_b']}</td><td>{t['ties']}</td>"
        f"<td>{pct(t['rate_a'])}</td><td>{pct(t['lo'])} – {pct(t['hi'])}</td></tr>"
        for t in rates["pairs"]
    )
    per_run = "".join(
        f"<tr class='run-row' data-run='{html.escape(r['run'])}' data-n='{r['n']}' data-rate='{r['rate']:.6f}'>"
        f"<td>{html.escape(r['run'])}</td><td>{r['n']}</td><td>{r['wins']}</td><td>{r['losses']}</td>"
        f"<td>{r['ties']}</td><td>{pct(r['rate'])}</td><td>{pct(r['lo'])} – {pct(r['hi'])}</td></tr>"
        for r in rates["runs"]
    )
    body = (
        "<h1>Preference results</h1><p class='muted'>Votes on the images now in this folder, all raters pooled. "
        "Win rate counts a tie as half a win; "
        "interval: 95% Wilson. <a href='/'>back to voting</a> · <a href='/results.json'>JSON</a></p>"
        "<h2>Per run pair</h2><table id='pairs'><tr><th>run A</th><th>run B</th><th>votes</th><th>A wins</th>"
        f"<th>B wins</th><th>ties</th><th>A win rate</th><th>95% interval</th></tr>{rows}</table>"
        "<h2>Per run, against all others</h2><table id='runs'><tr><th>run</th><th>votes</th><th>wins</th>"
        f"<th>losses</th><th>ties</th><th>win rate</th><th>95% interval</th></tr>{per_run}</table>{sections}"
    )
    return _page("Preference results", body)
