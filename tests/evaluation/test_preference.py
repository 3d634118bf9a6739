"""The preference page in real headless Chromium: anonymised pairs, votes in SQLite, resumption, win rates."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from evaluation import stats
from evaluation import store as preference

ROOT = Path(__file__).resolve().parents[2]


class Server:
    """`evaluation/serve EVALDIR --port 0` in its own process group."""

    def __init__(self, evaldir: Path):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "evaluation" / "serve"), "--profile", "demo", str(evaldir), "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line + self.proc.stdout.read(2000)
        self.url = line.split()[1]

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
def server_factory():
    servers = []

    def start(evaldir):
        servers.append(Server(evaldir))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


def _fresh_copy(evaldir: Path, tmp_path: Path) -> Path:
    """The evaluated images without any votes (each test gets its own database)."""
    out = tmp_path / "eval"
    for src in (evaldir / "images").rglob("*"):
        if src.is_file():
            dst = out / src.relative_to(evaldir)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
    return out


def test_vote_reload_restart_and_win_rates_in_chromium(evaldir, tmp_path, browser, server_factory):
    evaldir = _fresh_copy(evaldir, tmp_path)
    by_hash = {
        hashlib.sha256(p.read_bytes()).hexdigest(): (p.parent.name, p.stem) for p in evaldir.glob("images/*/*.png")
    }
    assert len(by_hash) == 12  # every image tells its run, prompt and seed apart
    server = server_factory(evaldir)
    browser.goto(server.url)

    def shown():
        """What the rater sees, de-anonymised by the test through the image bytes:
        (prompt, left run, right run, prompt_idx-seed)."""
        prompt, a, b = browser.evaluate(
            "[document.getElementById('prompt').textContent,"
            " document.getElementById('img-A').src, document.getElementById('img-B').src]"
        )
        (left, key), (right, key_b) = [
            by_hash[hashlib.sha256(urllib.request.urlopen(u, timeout=10).read()).hexdigest()] for u in (a, b)
        ]
        assert key == key_b and left != right  # one prompt and seed, two runs
        assert browser.evaluate("document.getElementById('img-A').naturalWidth") == 64  # the browser decoded it
        return prompt, left, right, key

    page = browser.evaluate("document.documentElement.outerHTML")
    # anonymised: no run name or image path (hex ids may contain "512" by chance)
    assert not re.search(r"tuned|(?<![0-9a-f])512(?![0-9a-f])|/images/", page), page
    assert browser.evaluate("document.getElementById('total').textContent") == "6"  # 3 prompts x 2 seeds x 1 run pair

    expected = {"512": 0, "tuned": 0, "tie": 0}
    seen = []
    for i, choice in enumerate(["A", "B", "tie", "A", "key-right"]):
        first = shown()
        browser.reload()  # a reload shows the same pair, the same way round
        prompt, left, right, key = shown()
        assert (prompt, left, right, key) == first
        seen.append(key)
        if choice == "key-right":  # the page's keyboard shortcut: → votes B
            browser.load(lambda: browser.key("ArrowRight", "ArrowRight", 39))
        else:
            browser.load(lambda: browser.click(f"#vote-{choice}"))
        expected[{"A": left, "B": right, "tie": "tie", "key-right": right}[choice]] += 1
        assert browser.evaluate("document.getElementById('judged').textContent") == str(i + 1)

    # Resumption: a reload, then a restarted server, show the one pair not judged yet.
    browser.reload()
    assert browser.evaluate("document.getElementById('judged').textContent") == "5"
    last = shown()
    assert last[3] not in seen and len(set(seen)) == 5
    server.stop()
    server = server_factory(evaldir)
    browser.goto(server.url)
    assert browser.evaluate("document.getElementById('judged').textContent") == "5" and shown() == last

    # Results, read from the page after the restart: the votes persisted and the win rates are the votes cast.
    browser.goto(server.url + "results")
    rows = browser.evaluate("[...document.querySelectorAll('#pairs tr.pair-row')].map(r => ({...r.dataset}))")
    assert len(rows) == 1
    row = rows[0]
    assert (row["runA"], row["runB"]) == ("512", "tuned")
    assert (int(row["n"]), int(row["winsA"]), int(row["winsB"]), int(row["ties"])) == (
        5,
        expected["512"],
        expected["tuned"],
        expected["tie"],
    )
    assert float(row["rateA"]) == pytest.approx((expected["512"] + 0.5 * expected["tie"]) / 5, abs=1e-6)
    runs = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#runs tr.run-row')]"
        ".map(r => [r.dataset.run, Number(r.dataset.rate)]))"
    )
    assert runs["tuned"] == pytest.approx(1 - float(row["rateA"]), abs=1e-6)

    # Judging the last pair finishes the set; votes are in the SQLite file.
    browser.goto(server.url)
    browser.load(lambda: browser.click("#vote-tie"))
    assert browser.evaluate("document.getElementById('done') !== null")
    assert len(preference.Store(evaldir / preference.DB).votes()) == 6


def test_sides_and_order_are_random_per_rater_but_stable():
    pairs = [preference.Pair(f"{i:016x}", i, 0, "p", "a", "b", Path("a.png"), Path("b.png")) for i in range(400)]
    flips = sum(preference.sides("salt", "r1", p)[0] == "b" for p in pairs)
    assert 150 < flips < 250  # about half the pairs show run b on the left
    assert [preference.sides("salt", "r1", p) for p in pairs] == [preference.sides("salt", "r1", p) for p in pairs]
    first = preference.next_pair(pairs, set(), "salt", "r1")
    assert first == preference.next_pair(pairs, set(), "salt", "r1")
    assert preference.next_pair(pairs, {first.id}, "salt", "r1") != first
    assert len({preference.next_pair(pairs, set(), "salt", f"r{i}").id for i in range(20)}) > 5


def test_regenerated_images_are_new_pairs_and_old_votes_stop_counting(evaldir, tmp_path):
    evaldir = _fresh_copy(evaldir, tmp_path)
    store = preference.Store(evaldir / preference.DB)
    before = preference.load_pairs(evaldir, store.salt)
    assert len(before) == 6 and preference.load_pairs(evaldir, store.salt) == before  # stable ids
    assert store.record("r", before[0], "left") and not store.record("r", before[0], "right")  # one vote per pair
    sidecar = evaldir / "images" / "tuned" / f"{before[0].prompt_idx}-{before[0].seed}.json"
    sidecar.write_text(sidecar.read_text().replace('"steps": 2', '"steps": 3'))  # as if regenerated
    after = preference.load_pairs(evaldir, store.salt)
    assert {p.id for p in after} ^ {p.id for p in before} == {before[0].id, after[0].id}
    assert len(store.votes()) == 1 and store.votes({p.id for p in after}) == []


def test_win_rates_and_wilson_intervals():
    votes = [("a", "b", "a")] * 6 + [("a", "b", "b")] * 2 + [("a", "b", None)] * 2 + [("a", "c", "c")]
    rates = stats.win_rates(votes)
    ab = next(t for t in rates["pairs"] if t["run_b"] == "b")
    assert (ab["n"], ab["wins_a"], ab["wins_b"], ab["ties"]) == (10, 6, 2, 2) and ab["rate_a"] == 0.7
    assert 0.39 < ab["lo"] < 0.7 < ab["hi"] < 0.92  # Wilson 95% for 7/10: [0.397, 0.892]
    per_run = {r["run"]: r for r in rates["runs"]}
    assert per_run["a"]["n"] == 11 and per_run["a"]["rate"] == pytest.approx(7 / 11)
    assert per_run["c"]["rate"] == 1.0 and per_run["c"]["hi"] == 1.0 and per_run["c"]["lo"] > 0
    assert stats.wilson(0.5, 0) == (0.0, 1.0)


def test_serve_errors_are_one_line_and_dry_run_writes_nothing(evaldir, tmp_path, capsys):
    from evaluation import serve

    serve.main([str(evaldir), "--dry-run"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["pairs"] == 6 and plan["runs"] == ["512", "tuned"] and plan["host"] == "127.0.0.1"
    assert not (evaldir / preference.DB).exists()

    for target, message in ((tmp_path / "none", "evaluation folder not found"), (tmp_path, "no image pairs")):
        with pytest.raises(SystemExit) as e:
            serve.main([str(target)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
