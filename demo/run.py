"""`make demo`: the whole SigmaForge flow on the bundled demo images, on one machine, offline.

Every step runs the real entry point as a user would type it (so any step can be rerun alone on
the previous step's output), against a local Ray and the tiny models built offline:

    images -> HTTP on 127.0.0.1 -> curation/run.py -> captioning/recaption -> encoding/encode
           -> training/finetune --stage 256 -> training/sample
           -> training/sample --prompts (its two kept checkpoints into eval/images/) -> evaluation/evaluate
           -> evaluation/judge (the tiny VLM)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from demo import images, serve, tiny_models

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a colourful abstract composition"
EVAL_PROMPTS = [PROMPT, "a red fox in the snow", "a lighthouse on a cliff at sunset"]


def command_line(argv: list[str]) -> str:
    """What a user pastes into a shell to rerun a step (quotes braces, globs and spaces)."""
    return shlex.join(["python", *argv])


def step(title: str, argv: list[str]) -> float:
    """Run one entry point from the repository root; stop the demo if it fails."""
    print(f"\n=== {title}\n$ {command_line(argv)}", flush=True)
    t0 = time.time()
    r = subprocess.run([sys.executable, *argv], cwd=ROOT)
    if r.returncode != 0:
        sys.exit(
            f"demo: step '{title}' failed (exit {r.returncode}); fix it and rerun `make demo` (finished steps are kept)"
        )
    return time.time() - t0


def write_urls(path: Path, base_url: str, rows: list[dict]) -> int:
    """The URL list: every demo file, plus a dead link and a non-http URL to show how failures are recorded."""
    urls = [f"{base_url}/{r['file']}" for r in rows] + [f"{base_url}/missing.jpg", "ftp://example.invalid/x.jpg"]
    captions = [r["caption"] for r in rows] + ["dead link", "not http"]
    pq.write_table(pa.table({"url": urls, "caption": captions, "source": ["demo"] * len(urls)}), path)
    return len(urls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="where everything goes (default: demo-out)")
    args = ap.parse_args()
    out = (ROOT / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prof = ["--profile", "demo"]
    timings = {}

    t0 = time.time()
    print("=== tiny models (built once, offline) and the demo images", flush=True)
    tiny_models.build(ROOT / ".cache" / "tiny")
    rows = images.write(out / "images")
    timings["setup"] = time.time() - t0

    with serve.ImageServer(out / "images") as server:
        n_urls = write_urls(out / "urls.parquet", server.url, rows)
        timings["curation"] = step(
            "curation", ["curation/run.py", "--urls", str(out / "urls.parquet"), "--out", str(out / "curated"), *prof]
        )
    timings["recaption"] = step(
        "recaption",
        ["captioning/recaption", "--shards", str(out / "curated" / "shards"), "--out", str(out / "captions"), *prof],
    )
    timings["encode"] = step(
        "encode",
        [
            "encoding/encode",
            "--images",
            str(out / "curated" / "shards" / "*.tar"),
            "--captions",
            str(out / "captions"),
            "--out",
            str(out / "encoded"),
            "--tier",
            "256",
            *prof,
        ],
    )
    timings["finetune"] = step(
        "finetune",
        [
            "training/finetune",
            "--stage",
            "256",
            "--data",
            str(out / "encoded"),
            "--out",
            str(out / "runs" / "256"),
            *prof,
        ],
    )
    sample = out / "samples" / "demo.png"
    timings["sample"] = step(
        "sample",
        [
            "training/sample",
            "--run",
            str(out / "runs" / "256"),
            "--prompt",
            PROMPT,
            "--size",
            "256x256",
            "--steps",
            "10",
            "--seed",
            "0",
            "--out",
            str(sample),
            *prof,
        ],
    )
    (out / "prompts.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    kept = sorted((out / "runs" / "256" / "checkpoints").glob("step-*/ema.safetensors"))  # the two newest steps
    timings["evaluate"] = sum(
        step(
            "eval images",
            [
                "training/sample",
                "--ckpt",
                str(ckpt),
                "--prompts",
                str(out / "prompts.txt"),
                "--out",
                str(out / "eval" / "images" / ckpt.parent.name),
                "--size",
                "256x256",
                "--steps",
                "10",
                *prof,
            ],
        )
        for ckpt in kept
    )
    timings["evaluate"] += step("evaluate", ["evaluation/evaluate", str(out / "eval"), *prof])
    timings["judge"] = step(
        "judge", ["evaluation/judge", str(ROOT / ".cache" / "tiny" / "captioner"), str(out / "eval"), *prof]
    )
    print_summary(out, n_urls, sample, timings)


def print_summary(out: Path, n_urls: int, sample: Path, timings: dict) -> None:
    manifest = pq.read_table(out / "curated" / "manifest.parquet").to_pandas()
    caption_files = sorted((out / "captions").glob("*.parquet"))
    captions = pd.concat([pd.read_parquet(f) for f in caption_files]) if caption_files else None
    index = pq.read_table(out / "encoded" / "index.parquet").to_pandas()
    log = out / "runs" / "256" / "log.txt"
    last_loss = _last_loss(log)
    print("\n" + "=" * 72)
    print(f"SigmaForge demo: {n_urls} URLs -> {out}")
    print("-" * 72)
    print("curation   ", ", ".join(f"{k}: {v}" for k, v in manifest["status"].value_counts().items()))
    reasons = manifest[manifest["status"] != "kept"]["reason"].value_counts()
    print("  reasons  ", ", ".join(f"{k}: {v}" for k, v in reasons.items()))
    kept = manifest[manifest["status"] == "kept"]
    print("  tiers    ", ", ".join(f"{k}: {v}" for k, v in kept["tier"].value_counts().items()), "(kept)")
    print(f"  shards    {len(list((out / 'curated' / 'shards').glob('*.tar')))} in {out / 'curated' / 'shards'}")
    print(f"  report    {out / 'curated' / 'report.html'}")
    if captions is not None:
        ok = captions[captions["status"] != "failed"]
        print(f"captions    {len(ok)} of {len(captions)} in {out / 'captions'}")
    print(f"encoded     {int((index['status'] == 'kept').sum())} samples at tier 256 in {out / 'encoded'}")
    print(f"training    final loss {last_loss} ({out / 'runs' / '256'})")
    print(f"sample      {sample}")
    print(
        f"evaluation  {out / 'eval' / 'summary.md'}; page: evaluation/serve {out / 'eval'} --profile demo "
        "(results: /results)"
    )
    print("time        " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print("=" * 72)
    (out / "summary.json").write_text(
        json.dumps({"urls": n_urls, "timings": timings, "final_loss": last_loss}, indent=2)
    )


def _last_loss(log: Path) -> str:
    if not log.exists():
        return "n/a"
    for line in reversed(log.read_text().splitlines()):
        if "loss" in line:
            return line.split("loss", 1)[1].strip(" =:").split()[0]
    return "n/a"


if __name__ == "__main__":
    main()
