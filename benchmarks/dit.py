"""DiT benchmarks on CPU -> benchmarks/results/dit.md.

1. KV compression (PixArt-Σ reports ~34% less time at high resolution): train step (fwd+bwd) and
   sampling step (fwd, no grad) with and without compression (r = 2 on every block of a narrow
   model) at the token counts of the 2K bucket (2048² -> 128 x 128 tokens) and the 4K bucket
   (2880² -> 180 x 180 tokens). Target: >= 1.5x at the 4K token count.
2. This model vs diffusers' `PixArtTransformer2DModel` with the same weights and input: train-step
   time (alternating, in one process) and the peak memory a step adds (a fresh process each).
   Target: <= 1.0x.

Usage: python -m benchmarks.dit [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

from training.model import PixArtSigma

ROOT = Path(__file__).resolve().parent.parent


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
    m = PixArtSigma(
        input_size=grid * 2,
        hidden_size=width,
        depth=depth,
        num_heads=4,
        caption_channels=32,
        model_max_length=120,
        kv_compress_layers=range(depth) if compress else (),
    )
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


def pair_steps(grid: int, width: int, depth: int, heads: int) -> dict:
    """Train-step closures of this model and diffusers' PixArtTransformer2DModel, same weights and input."""
    from diffusers import PixArtTransformer2DModel

    from training import convert

    torch.manual_seed(0)
    ours = PixArtSigma(
        input_size=grid * 2,
        hidden_size=width,
        depth=depth,
        num_heads=heads,
        caption_channels=4096,
        model_max_length=300,
        pe_interpolation=1.0,
    ).eval()
    cfg = {k: v for k, v in convert.diffusers_config(ours).items() if not k.startswith("_")}
    theirs = PixArtTransformer2DModel(**cfg)
    theirs.load_state_dict(convert.to_diffusers(ours.state_dict()))
    x = torch.randn(2, 4, grid * 2, grid * 2)
    t, y = torch.tensor([10, 900]), torch.randn(2, 300, 4096)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    mask[0, :120], mask[1, :250] = True, True
    cond = {"resolution": None, "aspect_ratio": None}
    runs = {
        "ours": (ours, lambda: ours(x, t, y, mask)),
        "diffusers": (
            theirs,
            lambda: theirs(x, y, t, encoder_attention_mask=mask.long(), added_cond_kwargs=cond).sample,
        ),
    }

    def make_step(model, run):
        def step():
            model.zero_grad(set_to_none=True)
            run().square().mean().backward()

        return step

    steps = {name: make_step(*r) for name, r in runs.items()}
    fixed = {p.untyped_storage().data_ptr() for p in [*ours.parameters(), *theirs.parameters(), x, y]}
    steps["saved_mb"] = {name: saved_for_backward(run, fixed) for name, (_, run) in runs.items()}
    return steps


def saved_for_backward(forward, fixed: set[int]) -> float:
    """MiB of activations autograd keeps for the backward pass (distinct storages, weights and inputs
    excluded): the part of a training step's peak memory that the model's code decides."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(n for ptr, n in storages.items() if ptr not in fixed) / 2**20


def memory_child(impl: str, **kw) -> dict:
    """In a fresh process: RSS at rest (both models, inputs, libraries) and the peak RSS that the first
    two steps of `impl` add on top (activations, gradients; sampled, since they are freed after)."""
    step = pair_steps(**kw)[impl]
    gc.collect()
    resting = psutil.Process().memory_info().rss
    peak, stop = [resting], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], psutil.Process().memory_info().rss)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    step()
    step()
    stop.set()
    watcher.join()
    return {"resting_mb": resting / 2**20, "step_mb": (peak[0] - resting) / 2**20}


def time_child(rounds: int, steps: int, **kw) -> dict:
    """In one process, alternating implementations (same allocator, threads and libraries): the median
    step time of each over `rounds` x `steps` steps, after one warm-up step each."""
    fns = pair_steps(**kw)
    saved = fns.pop("saved_mb")
    times = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: {"time": sorted(v)[len(v) // 2], "saved_mb": saved[name]} for name, v in times.items()}


def in_fresh_process(fn: str, **kw) -> dict:
    code = f"import json; from benchmarks.dit import {fn}; print(json.dumps({fn}(**{kw!r})))"
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
    lines = [
        "## DiT (training/model.py)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {threads} torch threads (CPU shared with "
        f"other jobs; load average {load:.1f} at start), torch {torch.__version__}. Command: "
        "`python -m benchmarks.dit`.",
        "",
        f"### KV compression (width {width}, depth {depth}, 4 heads, r = 2 on every block, batch 1, "
        f"120 caption tokens; one timed step each, no warm-up at these sizes)",
        "",
        "| token grid | tokens | train step plain (s) | train step KV (s) | speed-up | sampling step plain (s) "
        "| sampling step KV (s) | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, grid in grids.items():
        tp, sp = kv_case(grid, False, width, depth, repeats)
        tk, sk = kv_case(grid, True, width, depth, repeats)
        lines.append(
            f"| {name} | {grid * grid} | {tp:.2f} | {tk:.2f} | {tp / tk:.2f}x | {sp:.2f} | {sk:.2f} | {sp / sk:.2f}x |"
        )
        print(lines[-1], flush=True)
    cfg = dict(grid=16 if args.quick else 32, width=256, depth=4, heads=4)
    rounds, steps = 3, 3
    timed_ = in_fresh_process("time_child", rounds=rounds, steps=steps, **cfg)
    mem = {impl: in_fresh_process("memory_child", impl=impl, **cfg) for impl in ("ours", "diffusers")}
    rows = {impl: {**timed_[impl], **mem[impl]} for impl in ("ours", "diffusers")}
    ours, theirs = rows["ours"], rows["diffusers"]
    lines += [
        "",
        f"### This model vs diffusers PixArtTransformer2DModel (same weights and input: width "
        f"{cfg['width']}, depth {cfg['depth']}, {cfg['heads']} heads, {cfg['grid']}x{cfg['grid']} tokens, "
        f"batch 2, 300 x 4096 caption tokens with padding)",
        "",
        f"Train step: median of {rounds} alternating rounds x {steps} steps in one process. Activations: "
        "what autograd saves for the backward pass (saved-tensor hooks; deterministic). Peak RSS: a fresh "
        "process per implementation holding both models, RSS sampled every 2 ms during two steps, above "
        "its RSS at rest (allocator noise of a few %).",
        "",
        "| implementation | train step (s) | activations saved for backward (MiB) | peak RSS added by a step (MiB) |",
        "|---|---|---|---|",
    ]
    for name, r in (("ours", ours), ("diffusers", theirs)):
        lines.append(f"| {name} | {r['time']:.3f} | {r['saved_mb']:.1f} | {r['step_mb']:.0f} |")
    lines.append(
        f"| ratio ours / diffusers | {ours['time'] / theirs['time']:.2f}x | "
        f"{ours['saved_mb'] / theirs['saved_mb']:.2f}x | {ours['step_mb'] / max(theirs['step_mb'], 1e-9):.2f}x |"
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = ROOT / "benchmarks" / "results" / "dit.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
