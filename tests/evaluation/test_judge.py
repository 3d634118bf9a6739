"""The VLM judge on the tiny LLaVA through the real entry point and Ray; parsing; agreement; the study page."""

from __future__ import annotations

import json
import math
import shutil
import sqlite3

import numpy as np
import pytest

from evaluation import judge, stats, study
from evaluation import store as preference
from tests.evaluation.test_preference import _fresh_copy, server_factory  # noqa: F401 - a fixture
from tests.terminal import noise


@pytest.mark.parametrize(
    "answer,parsed",
    [
        ("A", "A"),
        ("B", "B"),
        ("tie", "tie"),
        ("Tie", "tie"),
        ("TIE.", "tie"),
        (" A\n", "A"),
        ("B.", "B"),
        ("**A**", "A"),
        ('"B"', "B"),
        ("a", "A"),
        ("`tie`", "tie"),
        ("A is better", "invalid"),
        ("Image A", "invalid"),
        ("The answer is B.", "invalid"),
        ("A or B", "invalid"),
        ("A, B", "invalid"),
        ("AB", "invalid"),
        ("Both are equal", "invalid"),
        ("", "invalid"),
        ("C", "invalid"),
        ("sunloudture shows W", "invalid"),
        ("A\nB", "invalid"),
        ("tied", "invalid"),
        ("B, because it is sharper", "invalid"),
    ],
)
def test_answers_are_parsed_strictly(answer, parsed):
    assert judge.parse_answer(answer) == parsed


@pytest.mark.slow
def test_judge_records_every_answer_both_orders_and_resumes(evaldir, tmp_path, tiny_models, command_cli):
    src, evaldir = evaldir, _fresh_copy(evaldir, tmp_path)
    shutil.copy(src / "summary.md", evaldir / "summary.md")
    model = tiny_models / "captioner"
    r = command_cli("evaluation/judge", model, evaldir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert not noise(r.stderr), noise(r.stderr)  # its local Ray's token-auth notice, the Judge actor's core_worker line
    store = preference.Store(evaldir / preference.DB)
    pairs = {p.id: p for p in preference.load_pairs(evaldir, store.salt)}
    rows = store.rows(source="judge")
    assert len(pairs) == 6 and len(rows) == 6 * judge.ANSWERS_PER_PAIR
    rater = judge.judge_id(str(model), None)
    assert {r["rater"] for r in rows} == {rater} and rater == f"{model.resolve()}@local"
    for pid, p in pairs.items():  # both orders of both questions for every pair
        mine = [r for r in rows if r["pair"] == pid]
        assert sorted((r["question"], r["left_run"], r["right_run"]) for r in mine) == sorted(
            (q, a, b) for q in judge.QUESTIONS for a, b in ((p.run_a, p.run_b), (p.run_b, p.run_a))
        )
    for r in rows:  # every raw answer kept; the choice is its strict parse, nothing guessed
        assert isinstance(r["answer"], str)
        assert r["choice"] == judge.CHOICE[judge.parse_answer(r["answer"])]
        assert r["winner"] == {"left": r["left_run"], "right": r["right_run"]}.get(r["choice"])
    assert sum(r["choice"] == "invalid" for r in rows) > 0  # the random model answers garbage

    # The recorded answers are the model's: one pair asked again here, outside Ray, one row at a time.
    one = next(iter(pairs.values()))
    actor = judge.Judge(str(model), dtype="float32", max_new_tokens=8, max_pixels=None, device="cpu")
    again = {}
    for task in judge.tasks([one]):
        out = actor({k: np.array([v], dtype=object) for k, v in task.items()})
        again[task["question"], task["left"]] = out["answer"][0]
    assert again == {(r["question"], r["left_run"]): r["answer"] for r in rows if r["pair"] == one.id}

    # Resume: a pair lost mid-run (its rows gone) is judged again; the others are skipped and kept.
    lost = sorted(pairs)[2]
    with sqlite3.connect(evaldir / preference.DB) as db:
        db.execute("DELETE FROM votes WHERE pair = ?", (lost,))
    kept = {(r["pair"], r["question"], r["left_run"]): r["created"] for r in rows if r["pair"] != lost}
    r = command_cli("evaluation/judge", model, evaldir)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "1 pairs judged (4 answers" in r.stdout and "5 already judged" in r.stdout, r.stdout
    after = store.rows(source="judge")
    assert (
        len(after) == 24
        and {(x["pair"], x["question"], x["left_run"]): x["created"] for x in after if x["pair"] != lost} == kept
    )
    r = command_cli("evaluation/judge", model, evaldir)
    assert "0 pairs judged" in r.stdout and "6 already judged" in r.stdout, r.stdout
    summary = (evaldir / "summary.md").read_text()
    assert summary.count(study.SUMMARY_MARK) == 1 and f"{rater} · quality" in summary
    assert summary.startswith("# Evaluation summary") and "| 512 | 512 | 6 |" in summary  # the scores part kept


def test_judge_errors_are_one_line_and_dry_run_writes_nothing(evaldir, tmp_path, tiny_models, command_cli):
    evaldir = _fresh_copy(evaldir, tmp_path)
    r = command_cli("evaluation/judge", tiny_models / "captioner", evaldir, "--dry-run")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["pairs"] == 6 and plan["todo"] == 6 and plan["prompts_per_pair"] == 4
    assert not (evaldir / preference.DB).exists()
    for args, message in (
        ((tmp_path / "none",), "evaluation folder not found"),
        ((tmp_path,), "no image pairs"),
        ((evaldir, "--set", "evaluation.judge.trust_remote_code=true"), "needs a pinned revision"),
    ):
        r = command_cli("evaluation/judge", tiny_models / "captioner", *args)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _row(pair, q, left, right, choice, source="judge", rater="j@local"):
    winner = {"left": left, "right": right}.get(choice)
    return {
        "rater": rater,
        "pair": pair,
        "question": q,
        "left_run": left,
        "right_run": right,
        "choice": choice,
        "winner": winner,
        "source": source,
    }


def test_verdicts_position_bias_and_kappa():
    pairs = {f"p{i}": preference.Pair(f"p{i}", i, 0, "x", "a", "b", None, None) for i in range(4)}
    rows = [  # p0: b in both orders; p1: "A" both times (position bias: no verdict either way, a tie);
        _row("p0", "quality", "a", "b", "right"),
        _row("p0", "quality", "b", "a", "left"),
        _row("p1", "quality", "a", "b", "left"),
        _row("p1", "quality", "b", "a", "left"),
        _row("p2", "quality", "a", "b", "invalid"),
        _row("p2", "quality", "b", "a", "left"),  # no verdict
        _row("p3", "quality", "a", "b", "tie"),
        _row("p3", "quality", "b", "a", "tie"),
    ]
    assert stats.judge_verdicts(rows, "quality") == {"p0": "b", "p1": None, "p3": None}
    bias = stats.position_bias(rows)
    assert (bias["answers"], bias["valid"], bias["invalid"]) == (8, 7, 1)
    assert bias["first"] == pytest.approx(4 / 7) and bias["second"] == pytest.approx(1 / 7)
    assert bias["order_pairs"] == 3 and bias["consistent"] == pytest.approx(2 / 3)  # p0 and p3 agree
    humans = [
        _row("p0", "overall", "a", "b", "right", "human", "h1"),
        _row("p1", "overall", "b", "a", "tie", "human", "h1"),
        _row("p3", "overall", "a", "b", "left", "human", "h1"),
        _row("p3", "overall", "b", "a", "left", "human", "h2"),
        _row("p3", "overall", "a", "b", "left", "human", "h3"),
    ]
    assert stats.human_verdicts(humans) == {"p0": "b", "p1": None, "p3": "a"}  # p3: three raters for a
    got = stats.agreement(humans + rows, pairs, judge.QUESTIONS)
    # labels on p0, p1, p3: human (b, tie, a), judge (b, tie, tie): observed 2/3, expected 1/9 + 2/9 = 1/3
    assert got["quality"]["n"] == 3 and got["quality"]["kappa"] == pytest.approx((2 / 3 - 1 / 3) / (1 - 1 / 3))
    assert got["alignment"]["n"] == 0 and math.isnan(got["alignment"]["kappa"])
    assert stats.cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert stats.cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)


def test_old_database_is_migrated_with_its_human_votes(tmp_path):
    db = tmp_path / preference.DB
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        con.execute("INSERT INTO meta VALUES ('salt', 'abc')")
        con.execute("""CREATE TABLE votes (rater TEXT NOT NULL, pair TEXT NOT NULL, prompt_idx INTEGER, seed INTEGER,
            run_a TEXT NOT NULL, run_b TEXT NOT NULL, left_run TEXT NOT NULL, right_run TEXT NOT NULL,
            choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie')), winner TEXT, created REAL,
            PRIMARY KEY (rater, pair))""")
        con.execute("INSERT INTO votes VALUES ('r', 'p', 0, 0, 'a', 'b', 'b', 'a', 'left', 'b', 1.0)")
    con.close()
    store = preference.Store(db)
    assert store.salt == "abc" and store.votes() == [("a", "b", "b")] and store.judged("r") == {"p"}
    assert store.rows()[0]["source"] == "human" and store.rows()[0]["question"] == "overall"


def test_study_page_shows_the_win_rate_chart_in_chromium(evaldir, tmp_path, browser, server_factory):  # noqa: F811 - the fixture imported above
    src, evaldir = evaldir, _fresh_copy(evaldir, tmp_path)
    shutil.copy(src / "metrics.json", evaldir / "metrics.json")
    store = preference.Store(evaldir / preference.DB)
    pairs = preference.load_pairs(evaldir, store.salt)
    # humans: 512 wins 4 of 6; the judge: quality always the first image (position bias), alignment always 512
    for i, p in enumerate(pairs):
        left, _ = preference.sides(store.salt, "h1", p)
        want_512 = i < 4
        store.record("h1", p, "left" if (left == "512") == want_512 else "right")
        store.record_judge(
            "j@local",
            p,
            [
                ("quality", p.run_a, "left", "A"),
                ("quality", p.run_b, "left", "A"),
                ("alignment", p.run_a, "left" if p.run_a == "512" else "right", "A"),
                ("alignment", p.run_b, "left" if p.run_b == "512" else "right", "B"),
            ],
        )
    server = server_factory(evaldir)
    browser.goto(server.url + "results")
    assert browser.evaluate("document.getElementById('winrate-chart') !== null")
    box = browser.evaluate(
        "(() => { const r = document.getElementById('winrate-chart').getBoundingClientRect();"
        " return [r.width, r.height]; })()"
    )
    assert box[0] > 500 and box[1] > 100  # drawn, not an empty element
    bars = browser.evaluate(
        "[...document.querySelectorAll('#winrate-chart rect.bar')].map(r => ({...r.dataset,"
        " w: r.getBoundingClientRect().width}))"
    )
    got = {(b["run"], b["series"]): float(b["rate"]) for b in bars}
    assert got[("512", "human")] == pytest.approx(4 / 6) and got[("tuned", "human")] == pytest.approx(2 / 6)
    assert got[("512", "j@local · quality")] == pytest.approx(0.5)  # first-position bias cancels over both orders
    assert got[("512", "j@local · alignment")] == 1.0 and got[("tuned", "j@local · alignment")] == 0.0
    widths = {(b["run"], b["series"]): b["w"] for b in bars}
    assert widths[("512", "j@local · alignment")] > widths[("512", "human")] > widths[("tuned", "human")]
    judges = browser.evaluate("[...document.querySelectorAll('#judges tr.judge-row')].map(r => r.textContent)")
    assert len(judges) == 1 and "75.0%" in judges[0]  # the first image: every quality and half the alignment answers
    kappa = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#judges td[data-kappa]')]"
        ".map(td => [td.dataset.kappa, [td.dataset.n, td.textContent]]))"
    )
    assert kappa["quality"][0] == "6" and kappa["alignment"][0] == "6"
    # alignment verdicts are 512 on every pair, humans 512 on 4: κ = 0 (the judge never varies)
    assert kappa["alignment"][1].startswith("0.00")
    scores = browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('#metrics tr.metric-row')].map(r =>"
        " [r.dataset.run, [...r.querySelectorAll('td[data-metric]')].map(td => td.dataset.metric)]))"
    )
    assert scores == {run: ["clip_score", "aesthetic", "hps", "pickscore"] for run in ("512", "tuned")}
    points = browser.evaluate(
        "[...document.querySelectorAll('svg.metric-chart[data-metric=clip_score] circle.point')]"
        ".map(c => [c.dataset.run, +c.dataset.value, c.getBoundingClientRect().width > 0])"
    )
    metrics = json.loads((evaldir / "metrics.json").read_text())["overall"]
    assert {run: pytest.approx(v) for run, v, _ in points} == {r: metrics[r]["clip_score"]["mean"] for r in metrics}
    assert all(drawn for *_, drawn in points)
    assert browser.errors == []
