"""Did the stage make the model better? The same prompts and seeds through every run, scored.

`training/evaluate --runs A B --prompts P --out EVALDIR` writes

    images/<run>/<prompt_idx>-<seed>.png   one image per run, prompt and seed, identical settings
    images/<run>/<prompt_idx>-<seed>.json  sidecar: prompt, run, stage, seed, steps, cfg, size, checkpoint
    scores.parquet                         one row per image: run, stage, prompt_idx, prompt, seed, clip_score, aesthetic
                                           (+ hps, pickscore: the reward models configured in evaluation.rewards)
    summary.md                             per run: mean and 95% bootstrap interval of each score, and the
                                           paired difference to the first run

`training/evaluate --serve EVALDIR` opens the side-by-side preference page (training/preference.py), and
`training/evaluate --judge MODEL EVALDIR` has a VLM vote on the same pairs (training/judge.py).

Identical settings: each (prompt, seed) is generated alone from `torch.Generator().manual_seed(seed)`,
so its initial noise is the same in every run (and the same as `training/sample --seed`).
CLIP score: 100 * cos(image, text) with the configured open_clip model (torchmetrics' CLIPScore
without its clamp at 0: real CLIP models give an image and its prompt ~0.2-0.35, never near 0,
while a random tiny model gives small negative values that the clamp would flatten). Aesthetic: curation's
scorer (CLIP embedding + LAION MLP head), reused as is. PixArt-Σ itself was judged by human and
GPT-4V preference, not FID; these automatic scores are the cheap loop between stages.
A rerun skips images whose sidecar already records the same settings. (Over 400 lines: generation,
scoring and the summary share the sidecar and score columns; the judge and the page live elsewhere.)
"""
from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shards.errors import SigmaError

IMAGES = "images"
SCORES = "scores.parquet"
SUMMARY = "summary.md"




# ---------------------------------------------------------------------------------------------
# Inputs: prompts and runs
# ---------------------------------------------------------------------------------------------


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt (one per non-blank line) or a .jsonl (objects with a "prompt" string)."""
    path = Path(path)
    if not path.is_file():
        raise SigmaError(f"{path}: prompt file not found")
    if path.suffix not in (".txt", ".jsonl"):
        raise SigmaError(f"{path}: prompt file must be .txt or .jsonl")
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line.strip())
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SigmaError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SigmaError(f'{path} line {n}: expected an object with a non-empty "prompt" string')
        prompts.append(row["prompt"].strip())
    if not prompts:
        raise SigmaError(f"{path}: no prompts in the file")
    return prompts


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    parts = [s.strip() for s in text.split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise SigmaError(f"--seeds {text}: expected distinct integers separated by commas, e.g. 0,1")
    return [int(p) for p in parts]


@dataclass
class Run:
    name: str  # folder name under images/: unique among the runs evaluated together
    path: Path  # what was given: a run folder or a checkpoint
    checkpoint: Path  # the weights read
    stage: str | None  # the configured stage (position setup); None: the released multi-scale setup


def resolve_runs(paths: list[str], stages) -> list[Run]:
    """Run folders (newest checkpoint, EMA preferred; the folder name picks the stage, as in
    training/sample) or checkpoint files. Names are the shortest unique path tails."""
    from training import runs as runs_mod

    runs = []
    for p in map(Path, paths):
        if not p.exists():
            raise SigmaError(f"{p}: run not found (want a run folder or a checkpoint file)")
        ckpt = runs_mod.find_run_checkpoint(p) if p.is_dir() and not _is_diffusers(p) else p
        stage = p.name if p.is_dir() and p.name in stages else None
        runs.append(Run("", p, ckpt, stage))
    for run, name in zip(runs, _unique_names([r.path for r in runs])):
        run.name = name
    return runs


def _is_diffusers(p: Path) -> bool:
    return (p / "config.json").exists() or (p / "transformer" / "config.json").exists()


def _unique_names(paths: list[Path]) -> list[str]:
    """The shortest path tails ('1k', 'exp2-1k', ...) that tell the runs apart."""
    parts = [list((p.resolve().with_suffix("") if p.is_file() else p.resolve()).parts[1:]) for p in paths]
    if len({tuple(p) for p in parts}) != len(parts):
        raise SigmaError("--runs: the same run is given twice")
    for k in range(1, max(map(len, parts)) + 1):
        names = ["-".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    raise SigmaError("--runs: cannot name the runs apart")


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def image_stem(out: Path, run: str, prompt_idx: int, seed: int) -> Path:
    return Path(out) / IMAGES / run / f"{prompt_idx}-{seed}"


def sidecar(run: Run, prompt_idx: int, prompt: str, seed: int, size, steps: int, cfg: float, uncond: str) -> dict:
    return {"prompt": prompt, "prompt_idx": prompt_idx, "run": run.name, "stage": run.stage, "seed": seed,
            "steps": steps, "cfg": cfg, "size": list(size), "uncond": uncond, "checkpoint": str(run.checkpoint)}


def _done(stem: Path, meta: dict) -> bool:
    js = stem.with_suffix(".json")
    if not (js.exists() and stem.with_suffix(".png").exists()):
        return False
    try:
        return json.loads(js.read_text()) == meta
    except json.JSONDecodeError:
        return False


def load_run_model(run: Run, dit: str, stages, size):
    """The run's DiT as training/sample builds it: the model its run.json records, else its stage's."""
    from training import runs as runs_mod

    found = runs_mod.recorded(run.path)
    if found is None:
        position = runs_mod.position_setup(stages[run.stage]) if run.stage else dict(runs_mod.DEFAULT_POSITION)
        found = dit, position
    return runs_mod.load_model(run.checkpoint, found[0], **runs_mod.position_for_size(found[1], *size))


def generate_run(gen, run: Run, prompts: list[str], seeds: list[int], size, steps: int, cfg: float,
                 out: Path, uncond: str = "official", log=print) -> int:
    """Every (prompt, seed) image of one run, skipping those already done; returns how many were made."""
    from shards.atomic import write_bytes, write_text

    made = 0
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            stem, meta = image_stem(out, run.name, i, seed), sidecar(run, i, prompt, seed, size, steps, cfg, uncond)
            if _done(stem, meta):
                continue
            stem.with_suffix(".json").unlink(missing_ok=True)  # a stale sidecar must not outlive its image
            image = gen([prompt], size[0], size[1], steps=steps, cfg_scale=cfg, seed=seed, uncond=uncond)[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            write_bytes(stem.with_suffix(".png"), buf.getvalue())
            write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")  # last: marks it done
            made += 1
        log(f"{run.name}: prompt {i + 1}/{len(prompts)}")
    return made


# ---------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------


class Scorer:
    """CLIP score and aesthetic score of (image, prompt) batches; one CLIP image pass feeds both.

    The image side is curation's `AestheticScorer` unchanged (its preprocessing, L2-normalised
    embedding and LAION head); the text side is the same open_clip model's text tower.
    `__call__({"image": [PIL], "prompt": [str]}) -> {"clip_score": [N], "aesthetic": [N]}`.
    """

    def __init__(self, clip_arch: str, clip_weights: str, clip_config_dir: str | None, aesthetic_head: str,
                 device="cpu", rewards: dict | None = None):
        import open_clip

        from encoders import aesthetic

        self.aesthetic = aesthetic.AestheticScorer(clip_arch, clip_weights, clip_config_dir, aesthetic_head, device)
        self.tokenizer = open_clip.get_tokenizer(clip_arch)  # its config was registered by load_clip
        self.rewards = rewards or {}  # column -> encoders.reward scorer

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        scored = self.aesthetic({"image": list(batch["image"])})
        img = torch.from_numpy(scored["clip_embedding"])  # [N, E], L2-normalised
        clip, device = self.aesthetic.clip, self.aesthetic.device
        txt = clip.encode_text(self.tokenizer(list(batch["prompt"])).to(device)).float().cpu()  # [N, E]
        txt = txt / txt.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        clip_score = 100 * (img * txt).sum(-1)  # [N]
        rewards = {name: r(list(batch["image"]), list(batch["prompt"])) for name, r in self.rewards.items()}
        return {"clip_score": clip_score.numpy(), "aesthetic": scored["aesthetic"], **rewards}


def score_images(scorer, metas: list[dict], out: Path, batch_size: int = 16):
    """One row per image (the sidecars `metas`): the table scores.parquet holds."""
    import pandas as pd
    from PIL import Image

    rows = []
    for start in range(0, len(metas), batch_size):
        chunk = metas[start:start + batch_size]
        stems = [image_stem(out, m["run"], m["prompt_idx"], m["seed"]) for m in chunk]
        images = []
        for s in stems:
            with Image.open(s.with_suffix(".png")) as im:
                images.append(im.convert("RGB"))
        scores = scorer({"image": images, "prompt": [m["prompt"] for m in chunk]})
        for j, (m, s) in enumerate(zip(chunk, stems)):
            rows.append({"run": m["run"], "stage": m["stage"], "prompt_idx": m["prompt_idx"], "prompt": m["prompt"],
                         "seed": m["seed"], "clip_score": float(scores["clip_score"][j]),
                         "aesthetic": float(scores["aesthetic"][j]),
                         **{k: float(v[j]) for k, v in scores.items() if k in REWARD_COLUMNS},
                         "image": str(s.with_suffix(".png").relative_to(out))})
    return pd.DataFrame(rows)


def bootstrap_ci(values, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (n_boot, len(values)))].mean(axis=1)  # [n_boot]
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


SCORE_COLUMNS = ("clip_score", "aesthetic")
REWARD_COLUMNS = ("hps", "pickscore")


def score_columns(df) -> list[str]:
    """The score columns a scores table has: CLIP and aesthetic, and the reward models scored."""
    return [c for c in SCORE_COLUMNS + REWARD_COLUMNS if c in df.columns]


def summarize(df, runs: list[str]) -> list[dict]:
    """Per run and score: n, mean, 95% interval; and per later run the paired difference to runs[0]
    over the same (prompt, seed) images."""
    rows = []
    for run in runs:
        d = df[df.run == run]
        for col in score_columns(df):
            lo, hi = bootstrap_ci(d[col])
            rows.append({"run": run, "stage": d.stage.iloc[0] if len(d) else None, "vs": None, "score": col,
                         "n": len(d), "mean": float(d[col].mean()), "lo": lo, "hi": hi})
    base = df[df.run == runs[0]].set_index(["prompt_idx", "seed"])
    for run in runs[1:]:
        d = df[df.run == run].set_index(["prompt_idx", "seed"])
        both = d.index.intersection(base.index)
        for col in score_columns(df):
            diff = d.loc[both, col] - base.loc[both, col]
            lo, hi = bootstrap_ci(diff)
            rows.append({"run": run, "vs": runs[0], "score": col, "n": len(diff), "mean": float(diff.mean()),
                         "lo": lo, "hi": hi})
    return rows


def summary_markdown(rows: list[dict], settings: dict) -> str:
    fmt = lambda r: f"{r['mean']:.3f} [{r['lo']:.3f}, {r['hi']:.3f}]"  # noqa: E731
    lines = ["# Evaluation summary", "",
             ", ".join(f"{k}: {v}" for k, v in settings.items()), "",
             "Mean and 95% bootstrap interval per run (2,000 resamples of the images).", "",
             "| run | stage | images | CLIP score | aesthetic |", "| --- | --- | ---: | --- | --- |"]
    per_run = {}
    for r in rows:
        if r["vs"] is None:
            per_run.setdefault(r["run"], {"n": r["n"], "stage": r["stage"] or "-"})[r["score"]] = fmt(r)
    lines += [f"| {run} | {v['stage']} | {v['n']} | {v['clip_score']} | {v['aesthetic']} |"
              for run, v in per_run.items()]
    paired = {}
    for r in rows:
        if r["vs"] is not None:
            paired.setdefault((r["run"], r["vs"]), {"n": r["n"]})[r["score"]] = fmt(r)
    if paired:
        lines += ["", "Paired difference to the first run over the same prompts and seeds "
                      "(an interval above 0: better).", "",
                  "| run | vs | pairs | Δ CLIP score | Δ aesthetic |", "| --- | --- | ---: | --- | --- |"]
        lines += [f"| {run} | {vs} | {v['n']} | {v['clip_score']} | {v['aesthetic']} |" for (run, vs), v in paired.items()]
    rewards = [c for c in REWARD_COLUMNS if any(c in v for v in per_run.values())]
    if rewards:
        lines += ["", "Reward models (HPSv2: image-text cosine; PickScore: scaled logit), mean and 95% interval; "
                      "Δ: paired difference to the first run.", "",
                  "| run | " + " | ".join(rewards) + " | " + " | ".join(f"Δ {c}" for c in rewards) + " |",
                  "| --- |" + " --- |" * (2 * len(rewards))]
        lines += [f"| {run} | " + " | ".join(v[c] for c in rewards) + " | "
                  + " | ".join(next((pv[c] for (r, _), pv in paired.items() if r == run), "-") for c in rewards) + " |"
                  for run, v in per_run.items()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# training/evaluate
# ---------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    from common import cli
    from shards.atomic import write_parquet, write_text
    from training import preference, sample, study

    p = cli.parser("training/evaluate", "Evaluate runs on a fixed prompt set: one image per run, prompt and seed "
                   "with identical settings, CLIP and aesthetic scores with 95% bootstrap intervals; or serve "
                   "the side-by-side preference page for an evaluated folder.",
                   "training/evaluate --runs runs/512 runs/1k --prompts prompts.txt --out eval/1k --seeds 0,1\n"
                   "  training/evaluate --serve eval/1k --port 8008\n"
                   "  training/evaluate --judge Qwen/Qwen2.5-VL-7B-Instruct eval/1k")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--runs", nargs="+", metavar="RUN", help="run folders (newest checkpoint, EMA preferred) "
                      "or checkpoint files; the first is the baseline of the paired differences")
    mode.add_argument("--serve", metavar="EVALDIR", help="serve the preference page for this evaluated folder")
    mode.add_argument("--judge", nargs=2, metavar=("MODEL", "EVALDIR"), help="have a VLM (any "
                      "AutoModelForImageTextToText: folder or hub id) judge every pair of EVALDIR, both orders, "
                      "quality and prompt alignment; votes beside the human ones (training/judge.py)")
    p.add_argument("--prompts", help="PROMPTS.txt (one per line) or PROMPTS.jsonl ({\"prompt\": ...} per line)")
    p.add_argument("--out", help="EVALDIR to write images, scores.parquet and summary.md into")
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH, multiples of 16 (default 1024x1024)")
    p.add_argument("--seeds", default="0,1", help="initial-noise seeds, the same for every run (default 0,1)")
    p.add_argument("--steps", type=int, default=None, help="DPM-Solver++ steps (default training.sample_steps)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default training.cfg_scale)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device to generate and score on (default: cuda if available, else cpu)")
    p.add_argument("--port", type=int, default=8008, help="--serve: port (0: any free one; default 8008)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (default 127.0.0.1: this machine only)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    if args.serve:
        try:
            preference.main_serve(args.serve, args.host, args.port, dry_run=args.dry_run)
        except SigmaError as e:
            cli.fail(str(e))
        return
    if args.judge:
        main_judge(cfg, *args.judge, dry_run=args.dry_run)
        return
    if not args.prompts or not args.out:
        cli.fail("--runs needs --prompts and --out")
    steps = cfg.training.sample_steps if args.steps is None else args.steps
    cfg_scale = cfg.training.cfg_scale if args.cfg is None else args.cfg
    try:
        size = sample.parse_size(args.size)
        sample.check_request(*size, steps)
        seeds = parse_seeds(args.seeds)
    except SigmaError as e:
        cli.fail(str(e))
    not_checked: list[str] = []  # a dry run before the prompts or runs exist: says what it could not check
    prompts: list = []
    runs: list = []
    try:
        prompts = read_prompts(args.prompts)
    except SigmaError as e:
        if not args.dry_run or Path(args.prompts).exists():  # a file that is there must be right
            cli.fail(str(e))
        not_checked.append(str(e))
    try:
        runs = resolve_runs(args.runs, cfg.training.stages)
    except SigmaError as e:
        if not args.dry_run or all(Path(r).exists() for r in args.runs):
            cli.fail(str(e))
        not_checked.append(str(e))
    for line in not_checked:
        print(f"dry run: not checked: {line}", file=sys.stderr)
    out = Path(args.out)
    settings = {"size": f"{size[0]}x{size[1]}", "steps": steps, "cfg": cfg_scale, "seeds": seeds,
                "prompts": len(prompts)}
    if args.dry_run:
        cli.print_plan({"runs": [{"name": r.name, "checkpoint": str(r.checkpoint), "stage": r.stage} for r in runs],
                        **settings, "images": len(runs) * len(prompts) * len(seeds), "dit": cfg.models.dit,
                        "t5": cfg.models.t5, "vae": cfg.models.vae, "clip": [cfg.models.clip.arch, cfg.models.clip.weights],
                        "aesthetic_head": cfg.models.aesthetic_head, "rewards": vars(cfg.evaluation.rewards),
                        "device": args.device, "out": str(out), **({"not_checked": not_checked} if not_checked else {})})
        return
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    gen = None
    try:
        for run in runs:
            model = load_run_model(run, cfg.models.dit, cfg.training.stages, size)
            if gen is None:
                gen = sample.Generator(model, cfg.models.t5, cfg.models.vae, args.device, dtype,
                                         t5_dtype=cfg.encode.t5_dtype, vae_dtype=cfg.encode.vae_dtype,
                                         max_length=cfg.encode.t5_max_length)
            else:
                gen.use(model)
            made = generate_run(gen, run, prompts, seeds, size, steps, cfg_scale, out)
            print(f"{run.name}: {made} images generated, {len(prompts) * len(seeds) - made} already there")
    except SigmaError as e:
        cli.fail(f"run {run.name}: {e}")
    del gen
    from encoders import reward

    try:
        rewards = reward.load(cfg.evaluation.rewards, args.device)
    except SigmaError as e:
        cli.fail(str(e))
    scorer = Scorer(cfg.models.clip.arch, cfg.models.clip.weights, cfg.models.clip.config_dir,
                    cfg.models.aesthetic_head, args.device, rewards)
    metas = [sidecar(r, i, pr, s, size, steps, cfg_scale, "official")
             for r in runs for i, pr in enumerate(prompts) for s in seeds]
    df = score_images(scorer, metas, out)
    write_parquet(out / SCORES, df)
    write_text(out / SUMMARY, summary_markdown(summarize(df, [r.name for r in runs]), settings))
    if (out / preference.DB).exists():  # votes already cast stay in the summary
        study.write_summary(out)
    print(f"wrote {out / SCORES} ({len(df)} images) and {out / SUMMARY}")


def main_judge(cfg, model: str, evaldir: str, dry_run: bool = False) -> None:
    """`training/evaluate --judge MODEL EVALDIR`: judge the pairs, then refresh the summary's preference part."""
    from common import cli
    from training import judge, study

    try:
        if dry_run and not Path(evaldir).is_dir():  # before `--runs` has written it: say so
            print(f"dry run: not checked: {evaldir}: evaluation folder not found", file=sys.stderr)
            cli.print_plan({"evaldir": evaldir, "judge": model, "not_checked": [f"{evaldir}: evaluation folder not found"]})
            return
        if dry_run:
            cli.print_plan(judge.plan(evaldir, model, cfg.evaluation.judge))
            return
        judge.run(cfg, model, evaldir)
        study.write_summary(evaldir)
    except SigmaError as e:
        cli.fail(str(e))
