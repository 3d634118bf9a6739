"""The metrics pass of evaluation/evaluate on CPU: images/s of CLIP-Score + aesthetic (tiny open_clip)
and of FID's Inception features (the full-size InceptionV3, random stand-in weights: the same FLOPs
as the real file), and the cost of one FID from features (2048-d, the library's eigendecomposition).

    .venv/bin/python -m benchmarks.metrics [--images 32] [--rounds 3]

Writes benchmarks/results/metrics.md with a labelled GPU estimate for MJHQ-30K (30,000 images).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common import config
from demo import tiny_models
from evaluation import fid, scores

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def rate(fn, n: int, rounds: int) -> tuple[float, float, float]:
    """(median, min, max) items/s over `rounds` calls of fn (one warm-up call first)."""
    fn()
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates), min(rates), max(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (MJHQ-30K's are 1024)")
    args = ap.parse_args()
    tiny_models.build(ROOT / ".cache" / "tiny")
    m = config.load(ROOT / "pipelines.yaml", "demo").models
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.images)
    ]
    prompts = ["a red fox in the snow"] * args.images
    scorer = scores.Scorer(m.clip.arch, m.clip.weights, m.clip.config_dir, m.aesthetic_head)
    clip = rate(lambda: scorer({"image": images, "prompt": prompts}), args.images, args.rounds)
    print(f"CLIP-Score + aesthetic: {clip[0]:.1f} images/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        extract = fid.InceptionFeatures(fid.write_standin(Path(tmp) / "inception.pth"))
        inception = rate(lambda: extract(images), args.images, args.rounds)
    print(f"Inception features: {inception[0]:.1f} images/s", flush=True)
    feats = rng.normal(size=(2 * 2048, 2048))  # full-rank covariances, as with thousands of images
    t0 = time.perf_counter()
    fid.frechet_distance(feats[:2048], feats[2048:] + 0.1)
    one_fid = time.perf_counter() - t0
    print(f"one FID at 2048-d: {one_fid:.1f} s", flush=True)
    load = os.getloadavg()[0]
    fmt = lambda r: f"{r[0]:.1f} ({r[1]:.1f}-{r[2]:.1f})"
    text = f"""## Evaluation metrics pass (`benchmarks/metrics.py`)

Machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), torch {torch.__version__}, \
{torch.get_num_threads()} threads; 1-min load average at the end {load:.1f}. {args.images} random \
{args.size}x{args.size} images, {args.rounds} rounds after a warm-up; images/s median (min-max). Command: \
`python -m benchmarks.metrics --images {args.images} --rounds {args.rounds} --size {args.size}`.

| pass | images/s (CPU) |
| --- | ---: |
| CLIP-Score + aesthetic, tiny open_clip (`evaluation/scores.py`) | {fmt(clip)} |
| FID features, full-size InceptionV3 at 299x299 (`evaluation/fid.py`, torchmetrics) | {fmt(inception)} |

One FID from 2048-d features of 2,048 images per side (torchmetrics' `_compute_fid`, float64, CPU): \
{one_fid:.1f} s; `--fid-resamples N` costs N of these per model and category, hence its default 0.

**GPU estimate for MJHQ-30K (not measured: no GPU was lent to this task).** InceptionV3 is ~5.7 GFLOPs \
per 299x299 image, so one A100/H100 extracts 30,000 images' features in well under a minute; decoding \
30,000 1024x1024 JPEGs (~10 ms each per core) takes ~20 s on 16 cores, and the reference features are \
cached (`fid-reference.npz`), so they are read once; each FID (one 2048x2048 eigendecomposition) takes \
seconds on a server CPU, ~11 per model with MJHQ's 10 categories. CLIP-Score with ViT-L/14 at ~312 images/s per A100 \
(the curation figure in README.md) is ~100 s per 30,000 images. Generating the 30,000 images dominates: \
Sana's table gives PixArt-Σ 0.4 samples/s at 1024x1024 (https://github.com/NVlabs/Sana, Performance), \
~21 GPU-hours per model.
"""
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "metrics.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
