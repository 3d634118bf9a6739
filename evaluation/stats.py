"""The study's statistics, each rule once: intervals, win rates, agreement, position bias.

Everything here is a plain function over numbers or vote rows (dicts with the columns of the votes
table, evaluation/store.py); nothing reads files. Used by the summary, the judge, the study and
the results page.
"""

from __future__ import annotations

import math

import numpy as np


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)  # [n_boot]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def wilson(score: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `score` over `n` trials."""
    if n == 0:
        return 0.0, 1.0
    centre = (score + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(score * (1 - score) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rates(votes) -> dict:
    """Per run pair and per run: votes, wins, losses, ties, win rate (ties half) and its interval.
    `votes`: (run_a, run_b, winner or None for a tie)."""
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
            r["n"], r["wins"], r["losses"], r["ties"] = (
                r["n"] + t["n"],
                r["wins"] + wins,
                r["losses"] + losses,
                r["ties"] + t["ties"],
            )
    for r in runs.values():
        r["rate"] = (r["wins"] + 0.5 * r["ties"]) / r["n"]
        r["lo"], r["hi"] = wilson(r["rate"], r["n"])
    return {
        "pairs": sorted(pairs.values(), key=lambda t: (t["run_a"], t["run_b"])),
        "runs": sorted(runs.values(), key=lambda r: -r["rate"]),
    }


def cohen_kappa(a: list, b: list) -> float:
    """Cohen's κ of two raters' labels on the same items (nan for no items; 1 for perfect agreement
    on a single category)."""
    n = len(a)
    if n == 0:
        return float("nan")
    observed = sum(x == y for x, y in zip(a, b)) / n
    labels = set(a) | set(b)
    expected = sum((a.count(k) / n) * (b.count(k) / n) for k in labels)
    if expected == 1:
        return 1.0 if observed == 1 else 0.0
    return (observed - expected) / (1 - expected)


def position_bias(rows: list[dict]) -> dict:
    """Of a judge's valid answers, how often it picked the first image (A), the second (B) or a tie,
    and on how many (pair, question)s its two orders agreed (same winner, or tie both times)."""
    valid = [r for r in rows if r["choice"] != "invalid"]
    n = len(valid)
    share = {c: (sum(r["choice"] == c for r in valid) / n if n else float("nan")) for c in ("left", "right", "tie")}
    both: dict[tuple, list] = {}
    for r in valid:
        both.setdefault((r["rater"], r["pair"], r["question"]), []).append(r["winner"])
    pairs = [w for w in both.values() if len(w) == 2]
    return {
        "answers": len(rows),
        "valid": n,
        "invalid": len(rows) - n,
        "first": share["left"],
        "second": share["right"],
        "tie": share["tie"],
        "order_pairs": len(pairs),
        "consistent": (sum(w[0] == w[1] for w in pairs) / len(pairs)) if pairs else float("nan"),
    }


def judge_verdicts(rows: list[dict], question: str, orders: int = 2) -> dict[str, str | None]:
    """Per pair: the run the judge prefers in both orders, None (a tie) if the orders disagree or
    tie; pairs with an invalid answer in either order have no verdict."""
    by_pair: dict[str, list] = {}
    for r in rows:
        if r["source"] == "judge" and r["question"] == question:
            by_pair.setdefault(r["pair"], []).append(r)
    out = {}
    for pair, rs in by_pair.items():
        if len(rs) == orders and all(r["choice"] != "invalid" for r in rs):
            out[pair] = rs[0]["winner"] if rs[0]["winner"] == rs[1]["winner"] else None
    return out


def human_verdicts(rows: list[dict]) -> dict[str, str | None]:
    """Per pair: the run most human raters preferred; None (a tie) for a tie vote majority or an even split."""
    counts: dict[str, dict] = {}
    for r in rows:
        if r["source"] == "human":
            c = counts.setdefault(r["pair"], {})
            c[r["winner"]] = c.get(r["winner"], 0) + 1
    out = {}
    for pair, c in counts.items():
        best = max(c.values())
        top = [w for w, k in c.items() if k == best]
        out[pair] = top[0] if len(top) == 1 else None
    return out


def agreement(rows: list[dict], pairs: dict, questions) -> dict:
    """Judge–human Cohen's κ per question over the pairs both have a verdict on (labels: run A wins,
    run B wins, tie). `pairs`: id -> an object with `run_a`."""
    human = human_verdicts(rows)
    out = {}
    for q in questions:
        judge = judge_verdicts(rows, q)
        both = sorted(set(human) & set(judge) & set(pairs))
        side = lambda pid, w: "tie" if w is None else ("a" if w == pairs[pid].run_a else "b")
        out[q] = {
            "n": len(both),
            "kappa": cohen_kappa([side(p, human[p]) for p in both], [side(p, judge[p]) for p in both]),
        }
    return out
