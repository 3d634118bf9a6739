"""The AI half of PixArt-Σ's preference study, with an open model: a local VLM judges image pairs.

`evaluation/judge MODEL EVALDIR`: for every pair of models sharing a (prompt, seed) image in
EVALDIR (the pairs of the human page, evaluation/store.py), MODEL (any transformers
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
from evaluation import store as votes
from shards.errors import SigmaError

QUESTIONS = {
    "quality": "Which image has the better visual quality (detail, sharpness, realism, no artifacts), "
    "regardless of the prompt?",
    "alignment": "Which image follows the prompt more faithfully (objects, attributes, counts, style)?",
}
assert tuple(QUESTIONS) == votes.JUDGE_QUESTIONS  # the votes table's CHECK constraint names them
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
    return [
        {"type": "text", "text": f'Two images were generated for the prompt: "{prompt}"\nImage A:'},
        {"type": "image"},
        {"type": "text", "text": "Image B:"},
        {"type": "image"},
        {"type": "text", "text": f"{QUESTIONS[question]} {ANSWER_RULE}"},
    ]


def judge_id(model: str, revision: str | None) -> str:
    """The rater recorded for a judge: model id + revision, or a folder's absolute path + 'local' (the
    same judge however its path was typed); never a human name (those have no '@')."""
    if Path(model).exists():
        return f"{Path(model).resolve()}@{revision or 'local'}"
    return f"{model}@{revision or 'main'}"


def check(judge: JudgeConfig) -> None:
    if judge.trust_remote_code and not judge.revision:
        raise SigmaError(
            "evaluation.judge.revision: trust_remote_code runs the model's own code and needs a "
            "pinned revision (a commit hash)"
        )
    r = judge.resources
    if r.batch_size < 1 or r.concurrency < 1 or r.num_gpus < 0 or r.num_cpus < 0:
        raise SigmaError(
            "evaluation.judge.resources: batch_size and concurrency must be >= 1, num_gpus and num_cpus >= 0"
        )


def tasks(pairs: list[votes.Pair]) -> list[dict]:
    """One row per (pair, order, question): what an actor needs, image paths instead of pixels."""
    rows = []
    for p in pairs:
        for left, right, first, second in (
            (p.run_a, p.run_b, p.image_a, p.image_b),
            (p.run_b, p.run_a, p.image_b, p.image_a),
        ):
            for q in QUESTIONS:
                rows.append(
                    {
                        "pair": p.id,
                        "question": q,
                        "left": left,
                        "right": right,
                        "prompt": p.prompt,
                        "image_left": str(first),
                        "image_right": str(second),
                    }
                )
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
            images = [
                self.decode(Path(path).read_bytes())
                for i in range(n)
                for path in (batch["image_left"][i], batch["image_right"][i])
            ]
            texts = [
                self.chat_text(
                    content(batch["prompt"][i], batch["question"][i]),
                    f"{batch['prompt'][i]} {QUESTIONS[batch['question'][i]]}",
                )
                for i in range(n)
            ]
            answers = self.generate(texts, images)
        except Exception as e:  # noqa: BLE001 - an unreadable image or out of memory: no votes (asked again)
            errors = [f"{type(e).__name__}: {e}"[:300]] * n
        out = {k: v for k, v in batch.items() if not k.startswith("image_")}
        out.update(
            answer=np.array(answers, dtype=object),
            error=np.array(errors, dtype=object),
            choice=np.array([parse_answer(a) for a in answers], dtype=object),
        )
        return out


CHOICE = {"A": "left", "B": "right", "tie": "tie", "invalid": "invalid"}  # as the votes table stores it


# ---------------------------------------------------------------------------------------------
# Run
# ---------------------------------------------------------------------------------------------


def plan(evaldir: str | Path, model: str, judge: JudgeConfig) -> dict:
    """What a run will do; `--dry-run` prints it (nothing is written)."""
    votes.require_local(evaldir)
    evaldir = Path(evaldir)
    if not evaldir.is_dir():
        raise SigmaError(f"{evaldir}: evaluation folder not found")
    check(judge)
    db = evaldir / votes.DB
    store = votes.Store(db) if db.exists() else None
    pairs = votes.load_pairs(evaldir, store.salt if store else "")
    if not pairs:
        raise SigmaError(
            f"{evaldir}: no image pairs (need images of two or more runs from "
            "training/sample --prompts or evaluation/generate)"
        )
    rater = judge_id(model, judge.revision)
    done = store.judge_done(rater, ANSWERS_PER_PAIR) & {p.id for p in pairs} if store else set()
    return {
        "evaldir": str(evaldir),
        "judge": rater,
        "pairs": len(pairs),
        "done": len(done),
        "todo": len(pairs) - len(done),
        "prompts_per_pair": ANSWERS_PER_PAIR,
        "questions": list(QUESTIONS),
        "dtype": judge.dtype,
        "max_new_tokens": judge.max_new_tokens,
        "max_pixels": judge.max_pixels,
        "trust_remote_code": judge.trust_remote_code,
        "resources": vars(judge.resources),
        "database": str(db),
    }


def run(cfg, model: str, evaldir: str | Path, log=print) -> dict:
    """Judge every pair not judged yet by this model; returns the counts (also printed)."""
    from common import progress, ray_start

    judge = cfg.evaluation.judge
    check(judge)
    votes.require_local(evaldir)
    evaldir = Path(evaldir)
    plan(evaldir, model, judge)  # the one-line errors before Ray starts
    from encoders import hub

    hub.require(model, "MODEL", judge.revision, what="judge")
    store = votes.Store(evaldir / votes.DB)
    pairs = votes.load_pairs(evaldir, store.salt)
    rater = judge_id(model, judge.revision)
    done = store.judge_done(rater, ANSWERS_PER_PAIR)
    todo = [p for p in pairs if p.id not in done]
    summary = {
        "judge": rater,
        "pairs": len(pairs),
        "skipped": len(pairs) - len(todo),
        "judged": 0,
        "answers": 0,
        "invalid": 0,
        "failed_pairs": 0,
    }
    if todo:
        ray_start.init_ray(cfg)
        import ray.data

        r = judge.resources
        kwargs = dict(
            model=model,
            revision=judge.revision,
            dtype=judge.dtype,
            max_new_tokens=judge.max_new_tokens,
            max_pixels=judge.max_pixels,
            trust_remote_code=judge.trust_remote_code,
        )
        ds = ray.data.from_items(tasks(todo))
        ds = ray_start.on_actors(ds, Judge, kwargs, r)
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
                progress.say(
                    f"pair {row['pair']}: not judged ({rows[0]['error'] or rows[-1]['error']})", file=sys.stderr
                )
                continue
            store.record_judge(
                rater, by_id[row["pair"]], [(x["question"], x["left"], CHOICE[x["choice"]], x["answer"]) for x in rows]
            )
            summary["judged"] += 1
            summary["answers"] += len(rows)
            summary["invalid"] += sum(x["choice"] == "invalid" for x in rows)
        bar.close()
    log(
        f"{rater}: {summary['judged']} pairs judged ({summary['answers']} answers, {summary['invalid']} invalid), "
        f"{summary['skipped']} already judged, {summary['failed_pairs']} failed"
    )
    return summary


def main(argv=None) -> None:
    """`evaluation/judge MODEL EVALDIR`: judge the pairs, then refresh the summary's preference part."""
    from common import cli
    from evaluation import study

    p = cli.parser(
        "evaluation/judge",
        "Have a VLM (any AutoModelForImageTextToText: folder or hub id) judge every "
        "pair of models in EVALDIR, both orders, quality and prompt alignment asked separately; votes "
        "go beside the human ones and summary.md gets the study.",
        "evaluation/judge Qwen/Qwen2.5-VL-7B-Instruct eval/1k",
    )
    p.add_argument("model", metavar="MODEL", help="the judge: a local folder or a hub id")
    p.add_argument("evaldir", metavar="EVALDIR", help="the evaluation folder (images/<model>/...)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    if args.dry_run and not Path(args.evaldir).is_dir():  # before training/sample has written it
        missing = cli.unchecked(f"{args.evaldir}: evaluation folder not found")
        cli.print_plan({"evaldir": args.evaldir, "judge": args.model, "not_checked": [missing]})
        return
    try:
        if args.dry_run:
            cli.print_plan(plan(args.evaldir, args.model, cfg.evaluation.judge))
            return
        run(cfg, args.model, args.evaldir)
        study.write_summary(args.evaldir)
    except SigmaError as e:
        cli.fail(str(e))
