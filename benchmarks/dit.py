"""DiT benchmarks on CPU -> benchmarks/results/dit.md.

1. KV compression (PixArt-Σ reports ~34% less time at high resolution): train step (fwd+bwd) and
   sampling step (fwd, no grad) with and without compression (r = 2 on every block of a narrow
   model) at the token counts of the 2K bucket (2048² -> 128 x 128 tokens) and the 4K bucket
   (2880² -> 180 x 180 tokens). Target: >= 1.5x at the 4K token count.
2. This model vs diffusers' `PixArtTransformer2DModel` with the same weights and input: train-step
   time and peak memory (each measured in a fresh process: peak RSS growth during the steps).
   Target: <= 1.0x.

Usage: python -m benchmarks.dit [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.model import PixArtSigma  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def kv_case(grid: int, compress: bool, width: int, depth: int, repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    m = PixArtSigma(input_size=grid * 2, hidden_size=width, depth=depth, num_heads=4, caption_channels=32,
                    model_max_length=120, kv_compress_layers=range(depth) if compress else ())
    x = torch.randn(1, 4, grid * 2, grid * 2)
    t, y, mask = torch.tensor([500]), torch.randn(1, 120, 32), torch.ones(1, 120, dtype=torch.bool)

    def train_step():
        m.zero_grad(set_to_none=True)
        m(x, t, y, mask).square().mean().backward()

    def sample_step():
        with torch.no_grad():
            m(x, t, y, mask)

    m.eval()  # no caption dropout; same compute
    warmup = 1 if grid <= 64 else 0  # a 4K-token step takes minutes on 2 cores: one timed call, no warm-up
    return timed(train_step, repeats, warmup), timed(sample_step, repeats, warmup)


def vs_diffusers_child(impl: str, grid: int, width: int, depth: int, heads: int, steps: int) -> dict:
    """Run in a fresh process: train-step time and peak RSS growth of one implementation."""
    from training import convert

    torch.manual_seed(0)
    ours = PixArtSigma(input_size=grid * 2, hidden_size=width, depth=depth, num_heads=heads, caption_channels=4096,
                       model_max_length=300, pe_interpolation=1.0)
    x = torch.randn(2, 4, grid * 2, grid * 2)
    t, y = torch.tensor([10, 900]), torch.randn(2, 300, 4096)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, :120], mask[1, :250] = True, True
    if impl == "diffusers":
        from diffusers import PixArtTransformer2DModel

        cfg = {k: v for k, v in convert.diffusers_config(ours).items() if not k.startswith("_")}
        model = PixArtTransformer2DModel(**cfg)
        model.load_state_dict(convert.to_diffusers(ours.state_dict()))
        del ours
        cond = {"resolution": None, "aspect_ratio": None}
        run = lambda: model(x, y, t, encoder_attention_mask=mask.long(), added_cond_kwargs=cond).sample  # noqa: E731
    else:
        model = ours.eval()
        run = lambda: model(x, t, y, mask)  # noqa: E731

    def step():
        model.zero_grad(set_to_none=True)
        run().square().mean().backward()

    step()  # warm-up: allocations of the first step count in the peak below
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"time": sorted(times)[len(times) // 2], "peak_mb": rss / 1024, "growth_mb": (rss - base) / 1024}


def vs_diffusers(impl: str, **kw) -> dict:
    code = (f"import json; from benchmarks.dit import vs_diffusers_child; "
            f"print(json.dumps(vs_diffusers_child({impl!r}, **{kw!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller token grids (a smoke run, not the recorded table)")
    args = ap.parse_args()
    grids = {"2K bucket (2048²)": 128, "4K bucket (2880²)": 180}
    if args.quick:
        grids = {"grid 32": 32, "grid 48": 48}
    width, depth, repeats = 64, 2, 1
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    lines = ["## DiT (training/model.py)", "",
             f"Machine: {platform.processor() or platform.machine()}, {threads} torch threads (CPU shared with "
             f"other jobs; load average {load:.1f} at start), torch {torch.__version__}. Command: "
             "`python -m benchmarks.dit`.", "",
             f"### KV compression (width {width}, depth {depth}, 4 heads, r = 2 on every block, batch 1, "
             f"120 caption tokens; one timed step each, no warm-up at these sizes)", "",
             "| token grid | tokens | train step plain (s) | train step KV (s) | speed-up | sampling step plain (s) "
             "| sampling step KV (s) | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for name, grid in grids.items():
        tp, sp = kv_case(grid, False, width, depth, repeats)
        tk, sk = kv_case(grid, True, width, depth, repeats)
        lines.append(f"| {name} | {grid * grid} | {tp:.2f} | {tk:.2f} | {tp / tk:.2f}x | {sp:.2f} | {sk:.2f} "
                     f"| {sp / sk:.2f}x |")
        print(lines[-1], flush=True)
    cfg = dict(grid=16 if args.quick else 32, width=256, depth=4, heads=4, steps=3)
    ours, theirs = vs_diffusers("ours", **cfg), vs_diffusers("diffusers", **cfg)
    lines += ["", f"### This model vs diffusers PixArtTransformer2DModel (same weights and input: width "
              f"{cfg['width']}, depth {cfg['depth']}, {cfg['heads']} heads, {cfg['grid']}x{cfg['grid']} tokens, "
              f"batch 2, 300 x 4096 caption tokens with padding; median of {cfg['steps']} train steps, fresh "
              "process each)", "",
              "| implementation | train step (s) | peak RSS (MB) | RSS growth during steps (MB) |", "|---|---|---|---|",
              f"| ours | {ours['time']:.3f} | {ours['peak_mb']:.0f} | {ours['growth_mb']:.0f} |",
              f"| diffusers | {theirs['time']:.3f} | {theirs['peak_mb']:.0f} | {theirs['growth_mb']:.0f} |",
              f"| ratio ours / diffusers | {ours['time'] / theirs['time']:.2f}x | "
              f"{ours['peak_mb'] / theirs['peak_mb']:.2f}x | |"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "dit.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
