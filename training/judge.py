"""The AI half of PixArt-Σ's preference study, with an open model: a local VLM judges image pairs.

`training/evaluate --judge MODEL EVALDIR`: for every pair of runs sharing a (prompt, seed) image in
EVALDIR (the pairs of the human page, training/preference.py), MODEL (any transformers
`AutoModelForImageTextToText`, a local folder or hub id) is shown the prompt and the two images and
asked two questions separately: which image has the better quality, and which follows the prompt
better. Each pair is asked in both orders, so a preference for the first (or second) image cancels
in the win rates and is reported on its own. Answers are parsed strictly (`A`, `B` or `tie`); any
other text is kept as `invalid` with the raw answer, never guessed.

Votes go into EVALDIR/preference.sqlite beside the human votes (source `judge`, rater = model id),
a pair's four answers in one transaction: a rerun skips the pairs already judged. The work runs
as a Ray Data actor pool like captioning (`evaluation.judge.resources`); actors read the images,
the driver only schedules and writes votes.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from common.config import JudgeConfig
from encoders.vlm import VLM
from shards.errors import SigmaError
from training import preference

QUESTIONS = {
    "quality": "Which image has the better visual quality (detail, sharpness, realism, no artifacts), "
               "regardless of the prompt?",
    "alignment": "Which image follows the prompt more faithfully (objects, attributes, counts, style)?",
}
ANSWER_RULE = "Answer with exactly one word: A, B, or tie."
ORDERS = 2  # (run_a, run_b) and (run_b, run_a)
ANSWERS_PER_PAIR = ORDERS * len(QUESTIONS)
_DECOR = re.compile(r"^[\s*_`'\"]+|[\s*_`'\".]+$")  # markdown emphasis, quotes, a final period


def parse_answer(text: str) -> str:
    """'A', 'B' or 'tie' if that is the whole answer (case, quotes, emphasis and a final period
    aside), else 'invalid'. "A is better", "Image B", "A or B" are invalid: nothing is guessed."""
    word = _DECOR.sub("", text or "")
    if word in ("A", "B", "a", "b"):
        return word.upper()
    return "tie" if word.lower() == "tie" else "invalid"


def content(prompt: str, question: str) -> list[dict]:
    """The user turn: the generation prompt, image A, image B, one question and the answer rule."""
    return [{"type": "text", "text": f'Two images were generated for the prompt: "{prompt}"\nImage A:'},
            {"type": "image"}, {"type": "text", "text": "Image B:"}, {"type": "image"},
            {"type": "text", "text": f"{QUESTIONS[question]} {ANSWER_RULE}"}]


def judge_id(model: str, revision: str | None) -> str:
    """The rater recorded for a judge: model id + revision, or a folder's absolute path + 'local' (the
    same judge however its path was typed); never a human name (those have no '@')."""
    if Path(model).exists():
        return f"{Path(model).resolve()}@{revision or 'local'}"
    return f"{model}@{revision or 'main'}"


def check(judge: JudgeConfig) -> None:
    if judge.trust_remote_code and not judge.revision:
        raise SigmaError("evaluation.judge.revision: trust_remote_code runs the model's own code and needs a "
                          "pinned revision (a commit hash)")
    r = judge.resources
    if r.batch_size < 1 or r.concurrency < 1 or r.num_gpus < 0 or r.num_cpus < 0:
        raise SigmaError("evaluation.judge.resources: batch_size and concurrency must be >= 1, "
                          "num_gpus and num_cpus >= 0")


def tasks(pairs: list[preference.Pair]) -> list[dict]:
    """One row per (pair, order, question): what an actor needs, image paths instead of pixels."""
    rows = []
    for p in pairs:
        for left, right, first, second in ((p.run_a, p.run_b, p.image_a, p.image_b),
                                           (p.run_b, p.run_a, p.image_b, p.image_a)):
            for q in QUESTIONS:
                rows.append({"pair": p.id, "question": q, "left": left, "right": right, "prompt": p.prompt,
                             "image_left": str(first), "image_right": str(second)})
    return rows


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class Judge(VLM):
    """Ray Data callable: task rows -> the same rows plus `answer` (raw) and `choice` (parsed); a
    batch whose images or generation fail comes back with `error` set and no answer (asked again next run)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["pair"])
        answers, errors = [""] * n, [""] * n
        try:
            images = [self.decode(Path(path).read_bytes()) for i in range(n)
                      for path in (batch["image_left"][i], batch["image_right"][i])]
            texts = [self.chat_text(content(batch["prompt"][i], batch["question"][i]),
                                    f"{batch['prompt'][i]} {QUESTIONS[batch['question'][i]]}") for i in range(n)]
            answers = self.generate(texts, images)
        except Exception as e:  # an unreadable image or out of memory: these rows are no votes (asked again)
            errors = [f"{type(e).__name__}: {e}"[:300]] * n
        out = {k: v for k, v in batch.items() if not k.startswith("image_")}
        out.update(answer=np.array(answers, dtype=object), error=np.array(errors, dtype=object),
                   choice=np.array([parse_answer(a) for a in answers], dtype=object))
        return out


CHOICE = {"A": "left", "B": "right", "tie": "tie", "invalid": "invalid"}  # as the votes table stores it


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def plan(evaldir: str | Path, model: str, judge: JudgeConfig) -> dict:
    """What a run will do; `--dry-run` prints it (nothing is written)."""
    evaldir = Path(evaldir)
    if not evaldir.is_dir():
        raise SigmaError(f"{evaldir}: evaluation folder not found")
    check(judge)
    db = evaldir / preference.DB
    store = preference.Store(db) if db.exists() else None
    pairs = preference.load_pairs(evaldir, store.salt if store else "")
    if not pairs:
        raise SigmaError(f"{evaldir}: no image pairs (need images of two or more runs from "
                                         "training/evaluate --runs)")
    rater = judge_id(model, judge.revision)
    done = store.judge_done(rater, ANSWERS_PER_PAIR) & {p.id for p in pairs} if store else set()
    return {"evaldir": str(evaldir), "judge": rater, "pairs": len(pairs), "done": len(done),
            "todo": len(pairs) - len(done), "prompts_per_pair": ANSWERS_PER_PAIR, "questions": list(QUESTIONS),
            "dtype": judge.dtype, "max_new_tokens": judge.max_new_tokens, "max_pixels": judge.max_pixels,
            "trust_remote_code": judge.trust_remote_code, "resources": vars(judge.resources),
            "database": str(db)}


def run(cfg, model: str, evaldir: str | Path, log=print) -> dict:
    """Judge every pair not judged yet by this model; returns the counts (also printed)."""
    from common import progress, ray_start

    judge = cfg.evaluation.judge
    check(judge)
    evaldir = Path(evaldir)
    plan(evaldir, model, judge)  # the one-line errors before Ray starts
    store = preference.Store(evaldir / preference.DB)
    pairs = preference.load_pairs(evaldir, store.salt)
    rater = judge_id(model, judge.revision)
    done = store.judge_done(rater, ANSWERS_PER_PAIR)
    todo = [p for p in pairs if p.id not in done]
    summary = {"judge": rater, "pairs": len(pairs), "skipped": len(pairs) - len(todo), "judged": 0,
               "answers": 0, "invalid": 0, "failed_pairs": 0}
    if todo:
        ray_start.init_ray(cfg)
        import ray.data

        r = judge.resources
        kwargs = dict(model=model, revision=judge.revision, dtype=judge.dtype, max_new_tokens=judge.max_new_tokens,
                      max_pixels=judge.max_pixels, trust_remote_code=judge.trust_remote_code)
        ds = ray.data.from_items(tasks(todo))
        ds = ds.map_batches(Judge, fn_constructor_kwargs=kwargs, batch_size=r.batch_size, num_gpus=r.num_gpus,
                            num_cpus=r.num_cpus, compute=ray.data.ActorPoolStrategy(size=r.concurrency),
                            batch_format="numpy")
        by_id = {p.id: p for p in todo}
        pending: dict[str, list[dict]] = {}
        bar = progress.bar(len(todo) * ANSWERS_PER_PAIR, "answer", "judge")
        for row in ds.iter_rows():
            bar.update(1)
            rows = pending.setdefault(row["pair"], [])
            rows.append(row)
            if len(rows) < ANSWERS_PER_PAIR:
                continue
            del pending[row["pair"]]
            if any(x["error"] for x in rows):  # not recorded: the next run asks again
                summary["failed_pairs"] += 1
                progress.say(f"pair {row['pair']}: not judged ({rows[0]['error'] or rows[-1]['error']})", file=sys.stderr)
                continue
            store.record_judge(rater, by_id[row["pair"]],
                               [(x["question"], x["left"], CHOICE[x["choice"]], x["answer"]) for x in rows])
            summary["judged"] += 1
            summary["answers"] += len(rows)
            summary["invalid"] += sum(x["choice"] == "invalid" for x in rows)
        bar.close()
    log(f"{rater}: {summary['judged']} pairs judged ({summary['answers']} answers, {summary['invalid']} invalid), "
        f"{summary['skipped']} already judged, {summary['failed_pairs']} failed")
    return summary


# ---------------------------------------------------------------------------------------------
# What the votes say: position bias, the judge's verdict per pair, agreement with humans
# ---------------------------------------------------------------------------------------------


def position_bias(rows: list[dict]) -> dict:
    """Of the valid answers, how often the judge picked the first image (A), the second (B) or a tie,
    and on how many (pair, question)s its two orders agreed (same winner, or tie both times)."""
    valid = [r for r in rows if r["choice"] != "invalid"]
    n = len(valid)
    share = {c: (sum(r["choice"] == c for r in valid) / n if n else float("nan")) for c in ("left", "right", "tie")}
    both: dict[tuple, list] = {}
    for r in valid:
        both.setdefault((r["rater"], r["pair"], r["question"]), []).append(r["winner"])
    pairs = [w for w in both.values() if len(w) == 2]
    return {"answers": len(rows), "valid": n, "invalid": len(rows) - n, "first": share["left"],
            "second": share["right"], "tie": share["tie"], "order_pairs": len(pairs),
            "consistent": (sum(w[0] == w[1] for w in pairs) / len(pairs)) if pairs else float("nan")}


def judge_verdicts(rows: list[dict], question: str) -> dict[str, str | None]:
    """Per pair: the run the judge prefers in both orders, None (a tie) if the orders disagree or
    tie; pairs with an invalid answer in either order have no verdict."""
    by_pair: dict[str, list] = {}
    for r in rows:
        if r["source"] == "judge" and r["question"] == question:
            by_pair.setdefault(r["pair"], []).append(r)
    out = {}
    for pair, rs in by_pair.items():
        if len(rs) == ORDERS and all(r["choice"] != "invalid" for r in rs):
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


def agreement(rows: list[dict], pairs: dict[str, preference.Pair]) -> dict:
    """Judge–human Cohen's κ per question over the pairs both have a verdict on (labels: run A wins,
    run B wins, tie)."""
    human = human_verdicts(rows)
    out = {}
    for q in QUESTIONS:
        judge = judge_verdicts(rows, q)
        both = sorted(set(human) & set(judge) & set(pairs))
        side = lambda pid, w: "tie" if w is None else ("a" if w == pairs[pid].run_a else "b")
        out[q] = {"n": len(both), "kappa": cohen_kappa([side(p, human[p]) for p in both],
                                                       [side(p, judge[p]) for p in both])}
    return out
