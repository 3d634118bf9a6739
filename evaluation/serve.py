"""`evaluation/serve EVALDIR`: the side-by-side preference page on 127.0.0.1, a small HTTP server.

PixArt-Σ was judged by human preference on a fixed prompt set; this runs that loop locally on the
images of EVALDIR (any model's folder under images/). Images are served under opaque ids, never
model names. `/results` shows the win rates (a tie counts half; 95% Wilson interval), the study
(evaluation/study.py) and the metrics (evaluation/results.py); `/results.json` the same numbers.
Standard library only.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from http import cookies
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from evaluation import page, results, stats, study
from evaluation.store import DB, Store, digest, load_pairs, next_pair, require_local
from shards.errors import SigmaError

RATER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CHOICES = {"A": "left", "B": "right", "tie": "tie"}


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
            raise SigmaError(
                f"{evaldir}: no image pairs (need images of two or more models under images/: "
                "training/sample --prompts, evaluation/generate)"
            )
        self.by_id = {p.id: p for p in self.pairs}
        self.tokens, self.files = {}, {}  # (pair id, run) -> token -> PNG path
        for p in self.pairs:
            for run, path in ((p.run_a, p.image_a), (p.run_b, p.image_b)):
                token = digest(self.store.salt, p.id, run)[:20]
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
        set_cookie = (
            {} if cookie == rater else {"Set-Cookie": f"rater={rater}; Path=/; Max-Age=31536000; SameSite=Strict"}
        )
        return rater, set_cookie

    def do_GET(self):
        app, path = self.app, urllib.parse.urlsplit(self.path).path
        if path == "/":
            rater, headers = self._rater()
            done = app.store.judged(rater) & app.by_id.keys()
            pair = next_pair(app.pairs, done, app.store.salt, rater)
            html = page.vote_page(pair, app.tokens, app.store.salt, rater, len(done), len(app.pairs))
            return self._send(200, html.encode(), "text/html; charset=utf-8", headers)
        if path.startswith("/image/") and path[7:] in app.files:
            return self._send(200, app.files[path[7:]].read_bytes(), "image/png")
        if path in ("/results", "/results.json"):
            rates, data = stats.win_rates(app.store.votes(app.by_id.keys())), study.collect(app.evaldir)
            metrics = results.read(app.evaldir)
            if path.endswith(".json"):
                return self._send(
                    200, results.dumps({**rates, "study": data, "metrics": metrics}).encode(), "application/json"
                )
            body = page.results_page(rates, study.section(data) + results.section(metrics))
            return self._send(200, body.encode(), "text/html; charset=utf-8")
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
            return self._send(
                400, b"bad vote: needs the rater cookie, a known pair and choice A, B or tie\n", "text/plain"
            )
        if self.app.store.record(rater, pair, choice):
            print(f"vote: rater {rater} pair {pair.id} {choice}", flush=True)
        self._send(303, b"", "text/plain", {"Location": "/"})


def make_server(evaldir: str | Path, host: str = "127.0.0.1", port: int = 8008) -> ThreadingHTTPServer:
    app = App(evaldir)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(evaldir: str, host: str, port: int, dry_run: bool = False) -> None:
    """Serve until interrupted; prints the address first (the tests read that line)."""
    from common import cli as cli_mod

    try:
        require_local(evaldir)
    except SigmaError as e:
        cli_mod.fail(str(e))
    if dry_run:  # no database written
        from common import cli

        if not Path(evaldir).is_dir():  # before training/sample has written it
            missing = cli.unchecked(f"{evaldir}: evaluation folder not found")
            cli.print_plan({"evaldir": evaldir, "host": host, "port": port, "not_checked": [missing]})
            return
        pairs = load_pairs(Path(evaldir), "")
        cli.print_plan(
            {
                "evaldir": evaldir,
                "host": host,
                "port": port,
                "pairs": len(pairs),
                "runs": sorted({r for p in pairs for r in (p.run_a, p.run_b)}),
                "database": str(Path(evaldir) / DB),
            }
        )
        return
    try:
        server = make_server(evaldir, host, port)
    except OSError as e:
        raise SigmaError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None
    app = server.RequestHandlerClass.app
    print(
        f"serving http://{host}:{server.server_address[1]}/ ({len(app.pairs)} pairs over {len(app.runs)} runs; "
        f"votes in {app.store.path}; Ctrl-C to stop)",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv=None) -> None:
    from common import cli

    p = cli.parser(
        "evaluation/serve",
        "Serve the side-by-side preference page for an evaluation folder (every "
        "pair of models on the same prompt and seed, anonymised) and its results page (win rates, "
        "the judges, the metrics with 95% intervals).",
        "evaluation/serve eval/1k --port 8008",
    )
    p.add_argument("evaldir", metavar="EVALDIR", help="the evaluation folder (images/<model>/...)")
    p.add_argument("--port", type=int, default=8008, help="port (0: any free one; default 8008)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    args = p.parse_args(argv)
    cli.load(args)
    try:
        serve(args.evaldir, args.host, args.port, dry_run=args.dry_run)
    except SigmaError as e:
        cli.fail(str(e))
