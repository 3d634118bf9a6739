"""Caption sets: what they cost on disk and in the loader, and whether the draw does what it says.

    .venv/bin/python -m benchmarks.caption_sets [--quick]        -> benchmarks/results/caption_sets.md

1. Bytes per sample with 1, 2 and 3 caption sets (side files `<fp8>-NNNNN.set-<NAME>.parquet` beside
   the latent tar; 4096-d fp16 features of the valid tokens only) vs PixArt-Σ's layout (one padded
   `savez_compressed` [1, 300, 4096] fp16 + mask per caption, + the VAE `.npy`), at a 1024² bucket.
   Sets: a Share-Captioner-like recaption (~195 tokens), a second captioner (~100 tokens), its
   first sentence (~20 tokens). Features are random normal fp16 (dense, as T5 outputs are).
2. Loader samples/s, 2 workers, the same folder: a rule drawing from 3 sets vs from 1 (the loader
   reads only the sets a rule can draw; target >= 0.95x).
3. The draw: per-set frequencies over 10^5 draws through the real loader vs the configured fixed
   weights and vs Sana's CLIP-Score rule (the expected count is the sum over the drawn samples of
   each rule's probabilities for that sample, so samples missing a set are accounted for exactly),
   and the draws before and after a kill -9 of the reading process: a restart with the same
   (seed, epoch) repeats them (what training/finetune does at a resume).

The toy training comparison (long-only vs mixed captions) is benchmarks/caption_toy.py.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks.rounds import spread
from shards import encoded, loader

ROOT = Path(__file__).resolve().parents[1]
C, L = 4096, 300
SETS = {"share": 195, "qwen": 100, "short": 20}  # mean tokens (with </s>)


def _lengths(mean: int, n: int, rng) -> np.ndarray:
    return np.clip(rng.normal(mean, mean * 0.15, n), 3, L).astype(int)


def write_folder(folder: Path, n: int, side: int, sets: dict[str, int], dim: int = C, seed: int = 0) -> Path:
    """A version 2 ENCDIR of `n` samples at one square bucket: random latents and set features, CLIP-Scores
    ~ N(28, 3) per set (set `short` misses every 4th sample)."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    fp = "c" * 16
    writer = encoded.BucketWriter(folder, (side, side), fp, shard_bytes=200_000_000, sets=tuple(sets))
    lens = {name: _lengths(mean, n, rng) for name, mean in sets.items()}
    for i in range(n):
        key = f"{i:08d}"
        mean = torch.from_numpy(rng.standard_normal((4, side // 8, side // 8)).astype(np.float16))
        side_sets = {}
        for name in sets:
            if name == "short" and i % 4 == 0:
                continue
            feats = torch.from_numpy(rng.standard_normal((int(lens[name][i]), dim)).astype(np.float16))
            side_sets[name] = (f"{name} {i}", feats, float(rng.normal(28, 3)))
        meta = dict(key=key, bucket="1.00", bucket_hw=[side, side], size=[side, side], resized=[side, side])
        meta.update(crop_box=[0, 0, side, side], source="00000.tar", fingerprint=fp, format_version=2)
        row = dict(key=key, status="kept", reason="", bucket="1.00", bucket_h=side, bucket_w=side)
        row.update(width=side, height=side, source="00000.tar", fingerprint=fp)
        writer.write(meta, None, encoded.pack_vae(mean, mean.abs(), 0.13025), row, side_sets)
    writer.close()
    save_file({"y_embedding": torch.zeros(L, dim)}, str(folder / "null_caption.safetensors"))
    info = dict(fingerprint=fp, tier="1k", table="1024", max_length=L, t5_dim=dim, scaling_factor=0.13025)
    info.update(latent_channels=4, null_caption="null_caption.safetensors")
    info["caption_sets"] = {name: {"from": "benchmark"} for name in sets}
    encoded.write_info(folder, info)
    return folder


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in (folder / encoded.SHARDS).rglob("*") if p.is_file())


def _pixart_bytes(n_tokens: int, rng) -> int:
    feat = rng.standard_normal((1, L, C)).astype(np.float16)  # padding rows are encoder outputs too
    mask = np.zeros((1, L), np.int64)
    mask[0, :n_tokens] = 1
    buf = io.BytesIO()
    np.savez_compressed(buf, caption_feature=feat, attention_mask=mask)
    return len(buf.getvalue())


def bench_bytes(n: int, tmp: Path) -> list[str]:
    rng = np.random.default_rng(1)
    vae = io.BytesIO()
    np.save(vae, rng.standard_normal((8, 128, 128)).astype(np.float16))
    pixart_caption = np.mean([_pixart_bytes(int(t), rng) for t in _lengths(150, min(n, 6), rng)])
    rows = [
        "| caption sets | tokens per sample | ours: bytes/sample | PixArt-Σ padded: bytes/sample | ratio |",
        "|---|---|---|---|---|",
    ]
    for k in (1, 2, 3):
        sets = dict(list(SETS.items())[:k])
        folder = write_folder(tmp / f"bytes{k}", n, 1024, sets)
        ours = _folder_bytes(folder) / n
        theirs = len(vae.getvalue()) + k * pixart_caption
        rows.append(
            f"| {', '.join(sets)} | {sum(sets.values())} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |"
        )
    return rows


def bench_loader(n: int, tmp: Path, batches: int, rounds: int = 5) -> list[str]:
    """Rounds alternate the two rules (which goes first alternates too), so a change in the machine's
    load hits both; the ratio is taken per round."""
    folder = write_folder(tmp / "loader", n, 256, SETS)
    rules = {"1 set": {"share": 1.0}, "3 sets": {"share": 0.5, "qwen": 0.3, "short": 0.2}}
    rates: dict[str, list[float]] = {label: [] for label in rules}
    for r in range(rounds):
        for label in list(rules)[:: 1 if r % 2 == 0 else -1]:
            dl = loader.make_loader(folder, batch_size=8, num_workers=2, rule=loader.caption_rule(rules[label]), seed=0)
            it = iter(dl)
            next(it)  # workers started
            t = time.perf_counter()
            got = sum(len(next(it)["keys"]) for _ in range(batches))
            rates[label].append(got / (time.perf_counter() - t))
            del it, dl
    ratios = [b / a for a, b in zip(rates["1 set"], rates["3 sets"])]
    return [
        f"| rule | sets read | samples/s, median (min-max) of {rounds} rounds |",
        "|---|---|---|",
        *(f"| {label} | {len(w)} | {spread(rates[label], '{:.0f}')} |" for label, w in rules.items()),
        f"| **3 sets / 1 set** (per round) | | **{spread(ratios, '{:.2f}x')}** |",
    ]


def expected(sample_sets: dict[str, float], rule: loader.CaptionRule) -> dict[str, float]:
    """Each set's probability for one sample ({set: CLIP-Score}) under the rule (the analytic form of
    loader.choose; Sana's rule: score ** (1 / T) over the candidates, else the best)."""
    present = [n for n in rule.weights if n in sample_sets]
    if rule.clip_score:
        cand = {n: s for n, s in sample_sets.items() if n in present and s >= rule.threshold}
        if not cand:
            best = max((n for n in present), key=lambda n: sample_sets[n])
            return {best: 1.0}
        w = {n: s ** (1 / rule.temperature) for n, s in cand.items()}
        return {n: v / sum(w.values()) for n, v in w.items()}
    positive = [n for n in present if rule.weights[n] > 0] or present[:1]
    total = sum(rule.weights[n] for n in positive)
    return {n: rule.weights[n] / total for n in positive}


def bench_draws(folder: Path, draws: int) -> list[str]:
    rules = {
        "fixed {share: 0.6, qwen: 0.3, short: 0.1}": loader.caption_rule({"share": 0.6, "qwen": 0.3, "short": 0.1}),
        "CLIP-Score, threshold 27, T = 0.5": loader.caption_rule(
            {"share": 1, "qwen": 1, "short": 1}, clip_score=True, threshold=27.0, temperature=0.5
        ),
    }
    scores = {}
    for tar in encoded.committed_shards(folder):
        for name in SETS:
            for r in encoded.read_set(encoded.set_file(tar, name), ["key", "t5_len", "clip_score"]):
                if r["t5_len"]:
                    scores.setdefault(r["key"], {})[name] = r["clip_score"]
    rows = [
        "| rule | set | drawn | expected | (drawn - expected) / sd |",
        "|---|---|---|---|---|",
    ]
    for label, rule in rules.items():
        seen, exp, var, n = Counter(), Counter(), Counter(), 0
        dl = loader.make_loader(folder, batch_size=64, num_workers=0, rule=rule, seed=7)
        for batch in dl:
            for key, src in zip(batch["keys"], batch["caption_source"]):
                seen[src] += 1
                for name, p in expected(scores[key], rule).items():
                    exp[name] += p
                    var[name] += p * (1 - p)
            n += len(batch["keys"])
            if n >= draws:
                break
        for name in SETS:
            z = (seen[name] - exp[name]) / math.sqrt(var[name]) if var[name] else 0.0
            rows.append(f"| {label} | {name} | {seen[name] / n:.4f} | {exp[name] / n:.4f} | {z:+.2f} |")
    return rows


def _child(folder: str, out: str, epoch: int) -> None:
    """The process that is killed: draws batches (one line of caption sets per batch) until stopped."""
    rule = loader.caption_rule({"share": 0.6, "qwen": 0.3, "short": 0.1})
    dl = loader.make_loader(folder, batch_size=16, num_workers=2, rule=rule, seed=3)
    dl.dataset.set_epoch(epoch)
    with open(out, "a") as f:
        for batch in dl:
            f.write(" ".join(batch["caption_source"]) + "\n")
            f.flush()


def bench_resume(folder: Path, tmp: Path, lines: int) -> list[str]:
    """Reference: `lines` batches uninterrupted. Killed run: kill -9 after ~lines/2 batches, restarted with
    the same (seed, epoch) as training/finetune restarts its streams at a checkpoint."""

    def run(out: Path, stop_at: int) -> None:
        cmd = [sys.executable, "-m", "benchmarks.caption_sets", "--child", str(folder), str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)  # its workers complain when killed
        while not out.exists() or len(out.read_text().splitlines()) < stop_at:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()

    ref, killed = tmp / "ref.txt", tmp / "killed.txt"
    run(ref, lines)
    run(killed, lines // 2)
    before = killed.read_text().splitlines()
    killed.unlink()
    run(killed, lines)
    after = killed.read_text().splitlines()[:lines]
    want = ref.read_text().splitlines()[:lines]
    same_before = before[: len(before)] == want[: len(before)]
    return [
        "| run | batches | identical to the uninterrupted run |",
        "|---|---|---|",
        f"| killed (kill -9) | {len(before)} | {'yes' if same_before else 'NO'} |",
        f"| restarted, same (seed, epoch) | {len(after)} | {'yes' if after == want else 'NO'} |",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script runs (numbers meaningless)")
    ap.add_argument("--loader-only", action="store_true", help="only the loader table, printed (no results file)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "caption_sets.md"))
    args = ap.parse_args()
    if args.child:
        _child(*args.child, epoch=0)
        return
    n_bytes, n_loader, batches, draws, lines = (4, 64, 10, 2_000, 20) if args.quick else (32, 512, 150, 100_000, 400)
    t0 = time.time()
    if args.loader_only:  # the one timing-sensitive part, alone (on a quiet machine); prints, writes no file
        with tempfile.TemporaryDirectory() as d:
            print("\n".join(bench_loader(n_loader, Path(d), batches, rounds=2 if args.quick else 5)))
        return
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bytes_rows = bench_bytes(n_bytes, tmp)
        loader_rows = bench_loader(n_loader, tmp, batches, rounds=2 if args.quick else 5)
        small = write_folder(tmp / "draws", 200, 64, SETS, dim=8)
        draw_rows = bench_draws(small, draws)
        resume_rows = bench_resume(small, tmp, lines)
    text = "\n".join(
        [
            f"## Caption sets{' (--quick: numbers meaningless)' if args.quick else ''}",
            "",
            f"Command: `python -m benchmarks.caption_sets{' --quick' if args.quick else ''}`; CPU, "
            f"torch {torch.__version__}.",
            "",
            f"### Bytes per sample, 1024² bucket, {n_bytes} samples",
            "",
            *bytes_rows,
            "",
            f"### Loader, 256² bucket, {n_loader} samples, batch 8, 2 workers, {batches} batches",
            "",
            *loader_rows,
            "",
            f"### The draw: {draws:,} draws through the loader (set `short` missing for 1 sample in 4)",
            "",
            *draw_rows,
            "",
            "### Resume after kill -9",
            "",
            *resume_rows,
            "",
            f"Total run time {time.time() - t0:.0f} s.",
        ]
    )
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
