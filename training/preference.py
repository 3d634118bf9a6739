"""The side-by-side preference page: one prompt, two anonymised images from different runs, A / tie / B.

PixArt-Σ was judged by human preference on a fixed prompt set; `training/evaluate --serve EVALDIR`
runs that loop locally on what `training/evaluate --runs ...` generated.

Pairs: for every (prompt, seed) that two or more runs have under EVALDIR/images, every pair of
those runs. Each rater (a cookie, or `?rater=NAME`) sees the pairs in their own random order with
random left/right, both drawn from a hash of (salt, rater, pair): a reload shows the same pair the
same way, and a restarted server resumes where the rater stopped. The salt is random per EVALDIR
and kept in the database, so neither order, sides nor ids can be read off the page; images are
served under opaque ids, never run names. (Over 400 lines: the vote store and the small HTTP server
that reads it are one unit; the results picture is training/study.py.)

Votes: EVALDIR/preference.sqlite, one row per (rater, pair), committed (synchronous=FULL) before
the reply: a vote the page acknowledged is on disk. The VLM judge (training/judge.py) writes its
votes into the same table (source `judge`); the results page adds the study (training/study.py). Results: per run pair, wins, ties and the win
rate (a tie counts half) with a 95% Wilson interval; the same per run against all others.
Standard library only, no external assets: works offline.
"""
from __future__ import annotations

import contextlib
import hashlib
import html
import json
import math
import re
import secrets
import sqlite3
import sys
import time
import urllib.parse
from dataclasses import dataclass
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import combinations
from pathlib import Path

from shards.errors import SigmaError

DB = "preference.sqlite"
RATER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHOICES = {"A": "left", "B": "right", "tie": "tie"}




# ---------------------------------------------------------------------------------------------
# Pairs and votes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    id: str  # opaque: hash of the salt and the key
    prompt_idx: int
    seed: int
    prompt: str
    run_a: str  # run_a < run_b
    run_b: str
    image_a: Path
    image_b: Path


def _hash(*parts) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def load_pairs(evaldir: Path, salt: str) -> list[Pair]:
    """Every pair of runs sharing a (prompt_idx, seed) image, from the sidecars.

    A pair's id covers both sidecars, so images regenerated with other settings or another
    checkpoint are new pairs: votes on the old ones stay in the database but no longer count.
    """
    groups: dict[tuple[int, int], dict[str, tuple[str, Path, str]]] = {}
    for js in sorted(Path(evaldir).glob("images/*/*.json")):
        png = js.with_suffix(".png")
        try:
            text = js.read_text()
            meta = json.loads(text)
            key, run, prompt = (int(meta["prompt_idx"]), int(meta["seed"])), str(meta["run"]), str(meta["prompt"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # not one of ours: skip
        if png.exists():
            groups.setdefault(key, {})[run] = (prompt, png, _hash(text))
    pairs = []
    for (idx, seed), by_run in sorted(groups.items()):
        for a, b in combinations(sorted(by_run), 2):
            (prompt, png_a, sig_a), (_, png_b, sig_b) = by_run[a], by_run[b]
            pairs.append(Pair(_hash(salt, idx, seed, a, b, sig_a, sig_b)[:16], idx, seed, prompt, a, b, png_a, png_b))
    return pairs


def sides(salt: str, rater: str, pair: Pair) -> tuple[str, str]:
    """(left run, right run) for this rater: random, but the same on every reload."""
    flip = int(_hash(salt, rater, pair.id, "side")[:8], 16) & 1
    return (pair.run_b, pair.run_a) if flip else (pair.run_a, pair.run_b)


def next_pair(pairs: list[Pair], done: set[str], salt: str, rater: str) -> Pair | None:
    """The rater's first unjudged pair in their own random order."""
    pending = [p for p in pairs if p.id not in done]
    return min(pending, key=lambda p: _hash(salt, rater, p.id, "order")) if pending else None


SOURCES = ("human", "judge")
QUESTIONS = ("overall", "quality", "alignment")  # humans answer one overall question; the judge two
VOTES_SQL = """CREATE TABLE IF NOT EXISTS votes (
    rater TEXT NOT NULL, pair TEXT NOT NULL, prompt_idx INTEGER, seed INTEGER,
    run_a TEXT NOT NULL, run_b TEXT NOT NULL, left_run TEXT NOT NULL, right_run TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'invalid')), winner TEXT, created REAL,
    source TEXT NOT NULL DEFAULT 'human' CHECK (source IN ('human', 'judge')),
    question TEXT NOT NULL DEFAULT 'overall' CHECK (question IN ('overall', 'quality', 'alignment')),
    answer TEXT, PRIMARY KEY (rater, pair, question, left_run))"""
COLUMNS = ("rater", "pair", "prompt_idx", "seed", "run_a", "run_b", "left_run", "right_run", "choice", "winner",
           "created", "source", "question", "answer")


class Store:
    """The SQLite file: a random salt and the votes of humans and judges, one table.

    One row per (rater, pair, question, left run): a human has one per pair (their side is fixed),
    a judge four (two questions, both orders). Judge answers it could not parse are kept as
    choice `invalid` with the raw answer. One connection per call (server threads).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            old = [r[1] for r in db.execute("PRAGMA table_info(votes)")]
            if old and "source" not in old:  # a database from before judge votes: human votes, kept
                db.execute("ALTER TABLE votes RENAME TO votes_v1")
            db.execute(VOTES_SQL)
            if old and "source" not in old:
                db.execute(f"INSERT INTO votes ({', '.join(old)}) SELECT {', '.join(old)} FROM votes_v1")
                db.execute("DROP TABLE votes_v1")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
            self.salt = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0]

    @contextlib.contextmanager
    def _connect(self):
        """A connection that commits on success and is always closed."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA synchronous=FULL")
            with db:
                yield db
        finally:
            db.close()

    def judged(self, rater: str) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT pair FROM votes WHERE rater = ? AND source = 'human'", (rater,))}

    def record(self, rater: str, pair: Pair, choice: str) -> bool:
        """Store a human vote (choice: left/right/tie as seen by this rater); False if already judged."""
        left, right = sides(self.salt, rater, pair)
        row = _row(rater, pair, left, right, choice, "human", "overall", None)
        with self._connect() as db:  # commits on leaving the block
            cur = db.execute(f"INSERT OR IGNORE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 14)})", row)
        return cur.rowcount == 1

    def record_judge(self, rater: str, pair: Pair, answers: list[tuple[str, str, str, str]]) -> None:
        """All of a judge's answers on one pair, (question, left run, choice, raw answer) each, in one
        transaction: a pair is judged completely or not at all (resumption is per pair)."""
        rows = [_row(rater, pair, left, pair.run_b if left == pair.run_a else pair.run_a, choice, "judge", q, answer)
                for q, left, choice, answer in answers]
        with self._connect() as db:
            db.executemany(f"INSERT OR REPLACE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 14)})", rows)

    def judge_done(self, rater: str, answers_per_pair: int) -> set[str]:
        """Pairs this judge has answered completely."""
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT pair FROM votes WHERE rater = ? AND source = 'judge' "
                                             "GROUP BY pair HAVING COUNT(*) = ?", (rater, answers_per_pair))}

    def votes(self, pairs=None, source: str = "human", question: str = "overall") -> list[tuple[str, str, str | None]]:
        """(run_a, run_b, winner) of every valid vote of `source` on `question` (only on `pairs`, ids, if
        given); winner None is a tie."""
        return [(r["run_a"], r["run_b"], r["winner"]) for r in self.rows(pairs, source, question)
                if r["choice"] != "invalid"]

    def rows(self, pairs=None, source: str | None = None, question: str | None = None) -> list[dict]:
        """Whole vote rows (invalid ones included), filtered."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM votes")]
        return [r for r in rows if (pairs is None or r["pair"] in pairs) and source in (None, r["source"])
                and question in (None, r["question"])]


def _row(rater: str, pair: Pair, left: str, right: str, choice: str, source: str, question: str, answer):
    winner = {"left": left, "right": right}.get(choice)  # None: a tie, or an invalid answer
    return (rater, pair.id, pair.prompt_idx, pair.seed, pair.run_a, pair.run_b, left, right, choice, winner,
            time.time(), source, question, answer)


# ---------------------------------------------------------------------------------------------
# Win rates
# ---------------------------------------------------------------------------------------------


def wilson(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `score` over `n` trials."""
    if n == 0:
        return 0.0, 1.0
    centre = (score + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(votes) -> dict:
    """Per run pair and per run: votes, wins, losses, ties, win rate (ties half) and its interval."""
    pairs: dict[tuple[str, str], dict] = {}
    for a, b, winner in votes:
        t = pairs.setdefault((a, b), {"run_a": a, "run_b": b, "n": 0, "wins_a": 0, "wins_b": 0, "ties": 0})
        t["n"] += 1
        t["wins_a" if winner == a else "wins_b" if winner == b else "ties"] += 1
    runs: dict[str, dict] = {}
    for t in pairs.values():
        t["rate_a"] = (t["wins_a"] + 0.5 * t["ties"]) / t["n"]
        t["lo"], t["hi"] = wilson(t["rate_a"], t["n"])
        for run, wins, losses in ((t["run_a"], t["wins_a"], t["wins_b"]), (t["run_b"], t["wins_b"], t["wins_a"])):
            r = runs.setdefault(run, {"run": run, "n": 0, "wins": 0, "losses": 0, "ties": 0})
            r["n"], r["wins"], r["losses"], r["ties"] = r["n"] + t["n"], r["wins"] + wins, r["losses"] + losses, \
                r["ties"] + t["ties"]
    for r in runs.values():
        r["rate"] = (r["wins"] + 0.5 * r["ties"]) / r["n"]
        r["lo"], r["hi"] = wilson(r["rate"], r["n"])
    return {"pairs": sorted(pairs.values(), key=lambda t: (t["run_a"], t["run_b"])),
            "runs": sorted(runs.values(), key=lambda r: -r["rate"])}


# ---------------------------------------------------------------------------------------------
# Pages (no external assets)
# ---------------------------------------------------------------------------------------------

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
    return (f"<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


def vote_page(pair: Pair | None, tokens: dict, salt: str, rater: str, judged: int, total: int) -> str:
    head = (f"<p class='muted'>rater <b id='rater'>{html.escape(rater)}</b> · judged "
            f"<span id='judged'>{judged}</span> of <span id='total'>{total}</span> · <a href='/results'>results</a></p>")
    if pair is None:
        return _page("Preference: done", head + "<h1 id='done'>All pairs judged. Thank you.</h1>")
    left, right = sides(salt, rater, pair)
    body = (f"{head}<div class='prompt' id='prompt'>{html.escape(pair.prompt)}</div>"
            f"<div class='pair'><div class='side'><h2>A</h2><img id='img-A' alt='A' src='/image/{tokens[pair.id, left]}'>"
            f"</div><div class='side'><h2>B</h2><img id='img-B' alt='B' src='/image/{tokens[pair.id, right]}'></div></div>"
            f"<form method='post' action='/vote' class='votes'><input type='hidden' name='pair' value='{pair.id}'>"
            "<button id='vote-A' name='choice' value='A'>A is better</button>"
            "<button id='vote-tie' name='choice' value='tie'>Tie</button>"
            "<button id='vote-B' name='choice' value='B'>B is better</button></form>"
            "<p class='muted'>Keys: ← or 1 for A, ↓ or 2 for a tie, → or 3 for B.</p>"
            f"<script>{KEYS_JS}</script>")
    return _page("Preference", body)


def results_page(rates: dict, study_html: str = "") -> str:
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    rows = "".join(
        f"<tr class='pair-row' data-run-a='{html.escape(t['run_a'])}' data-run-b='{html.escape(t['run_b'])}' "
        f"data-n='{t['n']}' data-wins-a='{t['wins_a']}' data-wins-b='{t['wins_b']}' data-ties='{t['ties']}' "
        f"data-rate-a='{t['rate_a']:.6f}'><td>{html.escape(t['run_a'])}</td><td>{html.escape(t['run_b'])}</td>"
        f"<td>{t['n']}</td><td>{t['wins_a']}</td><td>{t['wins_b']}</td><td>{t['ties']}</td>"
        f"<td>{pct(t['rate_a'])}</td><td>{pct(t['lo'])} – {pct(t['hi'])}</td></tr>" for t in rates["pairs"])
    per_run = "".join(
        f"<tr class='run-row' data-run='{html.escape(r['run'])}' data-n='{r['n']}' data-rate='{r['rate']:.6f}'>"
        f"<td>{html.escape(r['run'])}</td><td>{r['n']}</td><td>{r['wins']}</td><td>{r['losses']}</td>"
        f"<td>{r['ties']}</td><td>{pct(r['rate'])}</td><td>{pct(r['lo'])} – {pct(r['hi'])}</td></tr>"
        for r in rates["runs"])
    body = ("<h1>Preference results</h1><p class='muted'>Votes on the images now in this folder, all raters pooled. Win rate counts a tie as half a win; "
            "interval: 95% Wilson. <a href='/'>back to voting</a> · <a href='/results.json'>JSON</a></p>"
            "<h2>Per run pair</h2><table id='pairs'><tr><th>run A</th><th>run B</th><th>votes</th><th>A wins</th>"
            f"<th>B wins</th><th>ties</th><th>A win rate</th><th>95% interval</th></tr>{rows}</table>"
            "<h2>Per run, against all others</h2><table id='runs'><tr><th>run</th><th>votes</th><th>wins</th>"
            f"<th>losses</th><th>ties</th><th>win rate</th><th>95% interval</th></tr>{per_run}</table>{study_html}")
    return _page("Preference results", body)


# ---------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------


class App:
    """What the handler needs: the pairs, image tokens and the store."""

    def __init__(self, evaldir: str | Path):
        evaldir = Path(evaldir)
        if not evaldir.is_dir():
            raise SigmaError(f"{evaldir}: evaluation folder not found")
        self.evaldir = evaldir
        self.store = Store(evaldir / DB)
        self.pairs = load_pairs(evaldir, self.store.salt)
        if not self.pairs:
            raise SigmaError(f"{evaldir}: no image pairs (need images of two or more runs from training/evaluate)")
        self.by_id = {p.id: p for p in self.pairs}
        self.tokens, self.files = {}, {}  # (pair id, run) -> token -> PNG path
        for p in self.pairs:
            for run, path in ((p.run_a, p.image_a), (p.run_b, p.image_b)):
                token = _hash(self.store.salt, p.id, run)[:20]
                self.tokens[p.id, run], self.files[token] = token, path
        self.runs = sorted({r for p in self.pairs for r in (p.run_a, p.run_b)})


class Handler(BaseHTTPRequestHandler):
    app: App  # set on the subclass made by `make_server`

    def log_message(self, fmt, *args):  # one quiet line per vote instead of one per request
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _cookie(self) -> str:
        try:
            jar = cookies.SimpleCookie(self.headers.get("Cookie", ""))
        except cookies.CookieError:
            return ""
        return jar["rater"].value if "rater" in jar else ""

    def _rater(self) -> tuple[str, dict]:
        """The rater from ?rater=NAME or the cookie, else a new random one; headers to set it."""
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        cookie = self._cookie()
        given = query.get("rater", [None])[0] or cookie
        rater = given if given and RATER_RE.match(given) else secrets.token_hex(6)
        set_cookie = {} if cookie == rater else \
            {"Set-Cookie": f"rater={rater}; Path=/; Max-Age=31536000; SameSite=Strict"}
        return rater, set_cookie

    def do_GET(self):
        app, path = self.app, urllib.parse.urlsplit(self.path).path
        if path == "/":
            rater, headers = self._rater()
            done = app.store.judged(rater) & app.by_id.keys()
            pair = next_pair(app.pairs, done, app.store.salt, rater)
            page = vote_page(pair, app.tokens, app.store.salt, rater, len(done), len(app.pairs))
            return self._send(200, page.encode(), "text/html; charset=utf-8", headers)
        if path.startswith("/image/") and path[7:] in app.files:
            return self._send(200, app.files[path[7:]].read_bytes(), "image/png")
        if path in ("/results", "/results.json"):
            from training import study

            rates, data = win_rates(app.store.votes(app.by_id.keys())), study.collect(app.evaldir)
            if path.endswith(".json"):
                return self._send(200, json.dumps({**rates, "study": data}, indent=1).encode(), "application/json")
            return self._send(200, results_page(rates, study.section(data)).encode(), "text/html; charset=utf-8")
        self._send(404, b"not found\n", "text/plain")

    def do_POST(self):
        if urllib.parse.urlsplit(self.path).path != "/vote":
            return self._send(404, b"not found\n", "text/plain")
        length = int(self.headers.get("Content-Length") or 0)
        form = urllib.parse.parse_qs(self.rfile.read(min(length, 10_000)).decode("utf-8", "replace"))
        rater = self._cookie()
        pair = self.app.by_id.get(form.get("pair", [""])[0])
        choice = CHOICES.get(form.get("choice", [""])[0])
        if not RATER_RE.match(rater) or pair is None or choice is None:
            return self._send(400, b"bad vote: needs the rater cookie, a known pair and choice A, B or tie\n",
                              "text/plain")
        if self.app.store.record(rater, pair, choice):
            print(f"vote: rater {rater} pair {pair.id} {choice}", flush=True)
        self._send(303, b"", "text/plain", {"Location": "/"})


def make_server(evaldir: str | Path, host: str = "127.0.0.1", port: int = 8008) -> ThreadingHTTPServer:
    app = App(evaldir)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def main_serve(evaldir: str, host: str, port: int, dry_run: bool = False) -> None:
    """`training/evaluate --serve`: serve until interrupted; prints the address first."""
    if dry_run:  # no database written
        from common import cli

        if not Path(evaldir).is_dir():  # before `--runs` has written it: say so
            print(f"dry run: not checked: {evaldir}: evaluation folder not found", file=sys.stderr)
            cli.print_plan({"evaldir": evaldir, "host": host, "port": port,
                            "not_checked": [f"{evaldir}: evaluation folder not found"]})
            return
        pairs = load_pairs(Path(evaldir), "")
        cli.print_plan({"evaldir": evaldir, "host": host, "port": port, "pairs": len(pairs),
                        "runs": sorted({r for p in pairs for r in (p.run_a, p.run_b)}),
                        "database": str(Path(evaldir) / DB)})
        return
    try:
        server = make_server(evaldir, host, port)
    except OSError as e:
        raise SigmaError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None
    app = server.RequestHandlerClass.app
    print(f"serving http://{host}:{server.server_address[1]}/ ({len(app.pairs)} pairs over {len(app.runs)} runs; "
          f"votes in {app.store.path}; Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
