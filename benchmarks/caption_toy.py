"""A toy of the caption-mix question: trained on long captions only vs on long + short, how well does
the model follow a short prompt (and a long one)? Checked by a rule, on pictures drawn by code.

    .venv/bin/python -m benchmarks.caption_toy [--steps 300] [--images 64] [--quick]
    python -m benchmarks.caption_toy --gpu            # the GPU version (benchmarks/gpu.py prints it too)

Data: 256² scenes, each one flat-coloured shape (red, green, blue or yellow; circle or square) on a
light grey background, with two caption sets encoded by the tiny T5 (`encoders.t5`): `long` (a
40-word description naming the colour and shape once, in the middle of filler about rendering)
and `short` ("a red circle"); latents from the tiny VAE; a version 2 ENCDIR (`BucketWriter` with sets).
Two arms train the tiny DiT with the real `training/finetune` loop for the same steps and seed:
`captions.weights` {long: 1} vs {long: 0.5, short: 0.5}. Then `training/sample` draws each colour
with the short prompt and with the long prompt (4 seeds each) and the rule reads the picture: the
mean colour of the centre 64x64 (where every shape lies) is classified as the nearest of the four
colours; the score is the share of pictures whose colour is the prompted one (chance: 0.25).

What it can show: whether, at this scale, adding short captions changes how often a short prompt
gets its colour right, with the caption mix as the only difference. What it cannot: anything about
real prompts, real captioners or a 600M DiT; the tiny T5 has random weights (the model learns which
token ids go with which colour, not language), and with few steps both arms may sit at chance.
The GPU version uses more images, steps and seeds; its numbers are the ones worth reading.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 30)}
SHAPES = ("circle", "square")
SIDE = 256
FILLER = (
    "A simple computer rendering made for a test, shown at a modest size, that contains one {colour} "
    "{shape} near the middle of a plain light grey background, drawn with flat colour and clean edges, "
    "with no texture, no shadow, no text and no other object anywhere in the frame."
)
GPU_COMMAND = "python -m benchmarks.caption_toy --images 512 --steps 4000 --seeds 16 --device cuda"


def scene(colour: str, shape: str, seed: int) -> Image.Image:
    rng = random.Random(seed)
    img = Image.new("RGB", (SIDE, SIDE), (200, 200, 200))
    r = rng.randrange(60, 90)
    cx, cy = SIDE // 2 + rng.randrange(-20, 21), SIDE // 2 + rng.randrange(-20, 21)
    box = [cx - r, cy - r, cx + r, cy + r]
    draw = ImageDraw.Draw(img)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return img


def captions(colour: str, shape: str) -> dict[str, str]:
    return {"long": FILLER.format(colour=colour, shape=shape), "short": f"a {colour} {shape}"}


def encode(encdir: Path, n: int, models: Path) -> Path:
    """n scenes -> a version 2 ENCDIR at 256x256 with the caption sets long and short."""
    from safetensors.torch import save_file

    from encoders import t5 as t5_mod
    from encoders import vae as vae_mod
    from shards import encoded

    tok, enc = t5_mod.load_tokenizer(models / "t5"), t5_mod.load_t5(models / "t5", "float32")
    vae = vae_mod.load_vae(models / "vae", "float32")
    fp = "d" * 16
    writer = encoded.BucketWriter(encdir, (SIDE, SIDE), fp, shard_bytes=2_000_000, sets=("long", "short"))
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        texts = captions(colour, shape)
        feats, _ = t5_mod.encode_captions(tok, enc, list(texts.values()), max_length=300)
        pixels, _ = vae_mod.preprocess(scene(colour, shape, i), (SIDE, SIDE))
        mean, std = vae_mod.encode_latent_dist(vae, pixels[None])
        key = f"toy-{i:05d}"
        meta = dict(key=key, bucket="1.00", bucket_hw=[SIDE, SIDE], size=[SIDE, SIDE], resized=[SIDE, SIDE])
        meta.update(crop_box=[0, 0, SIDE, SIDE], source="toy", fingerprint=fp, format_version=2)
        row = dict(key=key, status="kept", reason="", bucket="1.00", bucket_h=SIDE, bucket_w=SIDE)
        row.update(width=SIDE, height=SIDE, source="toy", fingerprint=fp)
        sets = {name: (text, f, None) for (name, text), f in zip(texts.items(), feats)}
        writer.write(meta, None, encoded.pack_vae(mean[0], std[0], vae_mod.scaling_factor(vae)), row, sets)
    writer.close()
    save_file({"y_embedding": t5_mod.null_caption_embedding(tok, enc, 300)}, str(encdir / "null_caption.safetensors"))
    info = dict(fingerprint=fp, tier="256", table="256", max_length=300, t5_dim=int(feats[0].shape[1]))
    info.update(scaling_factor=vae_mod.scaling_factor(vae), latent_channels=4, null_caption="null_caption.safetensors")
    info["caption_sets"] = {"long": {"from": "toy"}, "short": {"from": "toy"}}
    encoded.write_info(encdir, info)
    return encdir


def train(data: Path, out: Path, steps: int, weights: dict[str, float], models: Path) -> list[float]:
    from training import finetune

    sets = [
        f"training.stages.256.captions.weights={json.dumps(weights)}",
        "training.stages.256.multi_scale=false",
        "training.stages.256.batch_size=8",
        "training.stages.256.warmup_steps=20",
        "training.stages.256.lr=1.0e-3",
        "training.stages.256.cfg_dropout=0.1",
        "training.sample_every=0",
        "training.log_every=10",
        f"training.checkpoint_every={steps}",
        "training.num_workers=0",
        f"models.t5={models / 't5'}",
        f"models.vae={models / 'vae'}",
    ]
    argv = ["--stage", "256", "--data", str(data), "--out", str(out), "--profile", "demo", "--max-steps", str(steps)]
    finetune.main(argv + [a for s in sets for a in ("--set", s)])
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([\d.]+)", (out / "log.txt").read_text())]


def colour_of(png: Path) -> str:
    """The rule: the centre 64x64's mean colour, classified as the nearest of the four."""
    a = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32)
    c = a[SIDE // 2 - 32 : SIDE // 2 + 32, SIDE // 2 - 32 : SIDE // 2 + 32].reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda k: float(((c - np.array(COLOURS[k])) ** 2).sum()))


def score(run: Path, seeds: int, out: Path, models: Path) -> dict[str, float]:
    from training import sample

    hits = {"short": 0, "long": 0}
    for colour in COLOURS:
        for kind, prompt in captions(colour, "circle").items():
            for seed in range(seeds):
                png = out / f"{run.name}-{kind}-{colour}-{seed}.png"
                sample.main(
                    ["--run", str(run), "--prompt", prompt, "--size", f"{SIDE}x{SIDE}", "--steps", "20"]
                    + ["--seed", str(seed), "--out", str(png), "--profile", "demo"]
                    + ["--set", f"models.t5={models / 't5'}", "--set", f"models.vae={models / 'vae'}"]
                )
                hits[kind] += colour_of(png) == colour
    return {k: v / (len(COLOURS) * seeds) for k, v in hits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=4, help="pictures per colour and prompt kind")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (CUDA_VISIBLE_DEVICES picks the card)")
    ap.add_argument("--quick", action="store_true", help="8 images, 4 steps, 1 seed: checks the script runs")
    ap.add_argument("--gpu", action="store_true", help="print the GPU version's command and exit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "caption_toy.md"))
    args = ap.parse_args()
    if args.gpu:
        print(GPU_COMMAND)
        return
    if args.quick:
        args.images, args.steps, args.seeds = 8, 4, 1
    if args.device == "cpu":
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the trainer and sampler pick CUDA when they see it
    from demo import tiny_models

    models = tiny_models.build(ROOT / ".cache" / "tiny")
    t0 = time.time()
    arms = {"long only": {"long": 1.0}, "long + short": {"long": 0.5, "short": 0.5}}
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = encode(tmp / "enc", args.images, models)
        for label, weights in arms.items():
            run = tmp / label.replace(" ", "").replace("+", "_")
            losses = train(data, run, args.steps, weights, models)
            acc = score(run, args.seeds, tmp, models)
            rows.append(
                f"| {label} | {json.dumps(weights)} | {losses[-1] if losses else float('nan'):.4f} "
                f"| {acc['short']:.2f} | {acc['long']:.2f} |"
            )
    text = "\n".join(
        [
            f"## Caption mix toy{' (--quick: meaningless)' if args.quick else ''}",
            "",
            f"`python -m benchmarks.caption_toy --images {args.images} --steps {args.steps} --seeds {args.seeds}"
            f" --device {args.device}`; tiny DiT, tiny T5 and VAE (random weights); {args.images} scenes.",
            "Score: share of generated pictures whose centre colour is the prompted one (chance 0.25).",
            "",
            "| arm | captions.weights | last logged loss | short prompts | long prompts |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Total run time {time.time() - t0:.0f} s.",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
