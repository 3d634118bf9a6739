"""`evaluation/evaluate EVALDIR`: score every image of every model in an evaluation folder.

EVALDIR/images/<model>/ holds one image per prompt and seed (shards/evalset.py), made by
`training/sample --prompts` (a run) or `evaluation/generate` (any diffusers pipeline). This writes

    scores.parquet   one row per image: run (= model folder), stage, prompt_idx, prompt, category, seed,
                     clip_score, aesthetic (+ hps, pickscore: the reward models in evaluation.rewards)
    metrics.json     per model and per prompt category: each score's mean and 95% bootstrap interval,
                     and with --reference the FID against that image set (evaluation/fid.py)
    summary.md       the same tables, the paired difference of each model to the first, and (once
                     votes exist) the preference study

CLIP-Score and aesthetic: evaluation/scores.py. PixArt-Σ itself was judged by human and GPT-4V
preference (evaluation/serve, evaluation/judge); FID and CLIP-Score on MJHQ-30K are what later
papers (Sana) tabulate, so both are here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from evaluation import fid, results, stats
from evaluation.scores import REWARD_COLUMNS, Scorer, score_columns, score_images
from shards import evalset, storage
from shards.errors import SigmaError

SCORES = "scores.parquet"
SUMMARY = "summary.md"
FID_CACHE = "fid-reference.npz"


def models(evaldir: Path) -> tuple[list[dict], list[str], dict]:
    """(sidecars, model names in order, each model's generation.json) of an evaluation folder."""
    if not evaldir.is_dir():
        raise SigmaError(f"{evaldir}: evaluation folder not found")
    metas = evalset.read_sidecars(evaldir)
    if not metas:
        raise SigmaError(
            f"{evaldir}: no images under {evalset.IMAGES}/ (write them with training/sample "
            "--prompts P --out EVALDIR/images/NAME or evaluation/generate)"
        )
    names = sorted({m["run"] for m in metas})
    records = {}
    for name in names:
        path = evaldir / evalset.IMAGES / name / evalset.RECORD
        records[name] = json.loads(path.read_text()) if path.exists() else None
    return metas, names, records


def summarize(df, runs: list[str]) -> list[dict]:
    """Per later run and score the paired difference to runs[0] over the same (prompt, seed) images."""
    rows = []
    base = df[df.run == runs[0]].set_index(["prompt_idx", "seed"])
    for run in runs[1:]:
        d = df[df.run == run].set_index(["prompt_idx", "seed"])
        both = d.index.intersection(base.index)
        for col in score_columns(df):
            diff = d.loc[both, col] - base.loc[both, col]
            lo, hi = stats.bootstrap_ci(diff)
            rows.append(
                {
                    "run": run,
                    "vs": runs[0],
                    "score": col,
                    "n": len(diff),
                    "mean": float(diff.mean()),
                    "lo": lo,
                    "hi": hi,
                }
            )
    return rows


def summary_markdown(metrics: dict, paired: list[dict], settings: dict) -> str:
    lines = [
        "# Evaluation summary",
        "",
        ", ".join(f"{k}: {v}" for k, v in settings.items()),
        "",
        "| model | stage | images | CLIP score | aesthetic |",
        "| --- | --- | ---: | --- | --- |",
    ]
    fmt = results.fmt
    for run, v in metrics["overall"].items():
        stage = (metrics["models"].get(run) or {}).get("stage") or "-"
        lines.append(f"| {run} | {stage} | {v['clip_score']['n']} | {fmt(v['clip_score'])} | {fmt(v['aesthetic'])} |")
    by_run: dict = {}
    for r in paired:
        by_run.setdefault((r["run"], r["vs"]), {"n": r["n"]})[r["score"]] = fmt(r)
    if by_run:
        cols = [c for c in ("clip_score", "aesthetic") + REWARD_COLUMNS if any(c in v for v in by_run.values())]
        lines += [
            "",
            "Paired difference to the first model over the same prompts and seeds (an interval above 0: better).",
            "",
            "| model | vs | pairs | " + " | ".join(f"Δ {c}" for c in cols) + " |",
            "| --- | --- | ---: |" + " --- |" * len(cols),
        ]
        lines += [
            f"| {run} | {vs} | {v['n']} | " + " | ".join(v.get(c, "-") for c in cols) + " |"
            for (run, vs), v in by_run.items()
        ]
    return "\n".join(lines) + "\n\n" + results.markdown(metrics)


def fid_all(
    metas: list[dict],
    runs: list[str],
    reference: str,
    inception: dict,
    features: int,
    resamples: int,
    evaldir: Path,
    device: str,
    log=print,
) -> tuple[dict, dict]:
    """{(run, category or None): FID result} over every model, overall and per category (the
    reference's category folders against the prompts' categories), and the reference's description.
    `inception`: `fid.inception_file`'s facts (whether its FIDs are comparable with published ones)."""
    from PIL import Image

    extract = fid.InceptionFeatures(inception["path"], features, device)
    ref, ref_cats = fid.reference_features(extract, reference, evaldir / FID_CACHE, log)
    out = {}
    for run in runs:
        mine = [m for m in metas if m["run"] == run]
        images = []
        for m in mine:
            with Image.open(m["png"]) as im:
                images.append(im.convert("RGB"))
        feats = extract(images)
        out[run, None] = fid.fid_with_interval(feats, ref, resamples)
        for cat in sorted({m.get("category") for m in mine} - {None}):
            fake = feats[[i for i, m in enumerate(mine) if m.get("category") == cat]]
            real = ref[[i for i, c in enumerate(ref_cats) if c == cat]]
            out[run, cat] = fid.fid_with_interval(fake, real, resamples)
        caveats = [inception["note"]] if inception["note"] else []
        if out[run, None]["biased"]:
            caveats.append(f"biased: fewer than {fid.MIN_IMAGES:,} images")
        log(f"{run}: FID {out[run, None]['fid']:.3f} over {len(mine)} images" + "".join(f" ({c})" for c in caveats))
    return out, {
        "path": str(reference),
        "n": len(ref),
        "features": features,
        "inception": inception["path"],
        "inception_sha256": inception["sha256"],
        "comparable": inception["comparable"],
        "note": inception["note"],
        "min_images": fid.MIN_IMAGES,
    }


def main(argv=None) -> None:
    from common import cli

    p = cli.parser(
        "evaluation/evaluate",
        "Score every model's images in an evaluation folder: CLIP-Score, "
        "aesthetic and the configured reward models per image, each model's means with 95% bootstrap "
        "intervals (overall and per prompt category), FID against a reference image set.",
        f"evaluation/evaluate eval/1k --reference mjhq30k_imgs --inception {fid.REFERENCE_FILE}",
    )
    p.add_argument("evaldir", metavar="EVALDIR", help="the evaluation folder: images/<model>/<prompt>-<seed>.png")
    p.add_argument("--reference", help="reference image folder for FID (MJHQ-30K's mjhq30k_imgs/<category>/...)")
    p.add_argument(
        "--inception",
        help=f"with --reference: torch-fidelity's InceptionV3 weights file ({fid.REFERENCE_FILE}); "
        "never downloaded; any other file's FIDs are labelled not comparable",
    )
    p.add_argument(
        "--fid-features",
        type=int,
        default=fid.FEATURES,
        choices=(64, 192, 768, 2048),
        help="Inception features for FID (default 2048, the one papers report)",
    )
    p.add_argument(
        "--fid-resamples",
        type=int,
        default=0,
        help="bootstrap resamples for an FID interval (default 0: "
        "the point value only; each costs one FID, a 2048x2048 eigendecomposition: ~100 s on a busy 2-core "
        "CPU, see benchmarks/RESULTS.md)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device to score on (default: cuda if available, else cpu)",
    )
    args = p.parse_args(argv)
    cfg = cli.load(args)
    from encoders import hub

    hub.configure(cfg.storage)  # model folders given as bucket URLs: copied once into storage.cache.models
    try:
        where = storage.resolve(args.evaldir, cfg.storage)
    except SigmaError as e:
        cli.fail(str(e))
    if where.is_local:
        evaluate_folder(args, cfg, Path(args.evaldir))
        return
    with evalset.working_copy(where) as local:  # a bucket: scored in a local copy, its outputs uploaded after
        evaluate_folder(args, cfg, local, str(where))


def evaluate_folder(args, cfg, evaldir: Path, shown: str | None = None) -> None:
    """`evaluation/evaluate` on a local EVALDIR (`shown`: the bucket URL it is a copy of, for the last line)."""
    from common import cli
    from evaluation import study
    from evaluation.store import DB
    from shards.atomic import write_parquet, write_text

    if args.dry_run and not evaldir.is_dir():  # before training/sample has written it
        missing = cli.unchecked(f"{evaldir}: evaluation folder not found")
        cli.print_plan(
            {
                "evaldir": str(evaldir),
                "reference": args.reference,
                "inception": args.inception,
                "fid_features": args.fid_features,
                "device": args.device,
                "not_checked": [missing],
            }
        )
        return
    inception = None
    try:  # every input checked before any model loads: one line each
        if args.reference and not args.inception:
            raise SigmaError("--reference needs --inception FILE (the Inception weights are never downloaded)")
        if args.inception and not args.reference:
            raise SigmaError("--inception needs --reference DIR (the image set FID compares against)")
        metas, runs, records = models(evaldir)
        if args.reference:
            fid.reference_images(args.reference)
            inception = fid.inception_file(args.inception)
    except SigmaError as e:
        cli.fail(str(e))
    if args.dry_run:
        cli.print_plan(
            {
                "evaldir": str(evaldir),
                "models": {r: sum(m["run"] == r for m in metas) for r in runs},
                "clip": [cfg.models.clip.arch, cfg.models.clip.weights],
                "aesthetic_head": cfg.models.aesthetic_head,
                "rewards": vars(cfg.evaluation.rewards),
                "reference": args.reference,
                "inception": args.inception,
                "fid_features": args.fid_features,
                "device": args.device,
            }
        )
        return
    from encoders import hub, reward

    try:
        hub.require_clip(cfg.models.clip.arch, cfg.models.clip.weights)  # one line, before any model loads
        rewards = reward.load(cfg.evaluation.rewards, args.device)
        scorer = Scorer(
            cfg.models.clip.arch,
            cfg.models.clip.weights,
            cfg.models.clip.config_dir,
            cfg.models.aesthetic_head,
            args.device,
            rewards,
        )
        df = score_images(scorer, metas, evaldir)
        del scorer
        fids, reference = (
            fid_all(metas, runs, args.reference, inception, args.fid_features, args.fid_resamples, evaldir, args.device)
            if inception
            else ({}, None)
        )
    except SigmaError as e:
        cli.fail(str(e))
    metrics = results.collect(df, runs, fids, records, reference)
    write_parquet(evaldir / SCORES, df)
    results.write(evaldir, metrics)
    settings = {
        "models": len(runs),
        "images": len(df),
        "prompts": df.prompt_idx.nunique(),
        "seeds": sorted(df.seed.unique().tolist()),
    }
    write_text(evaldir / SUMMARY, summary_markdown(metrics, summarize(df, runs), settings))
    if (evaldir / DB).exists():  # votes already cast stay in the summary
        study.write_summary(evaldir)
    named = (lambda name: f"{shown}/{name}") if shown else (lambda name: evaldir / name)
    print(
        f"wrote {named(SCORES)} ({len(df)} images of {len(runs)} models), {named(results.METRICS)} and {named(SUMMARY)}"
    )
