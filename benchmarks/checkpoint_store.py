"""Checkpoint save and resume (load) time to an object store (moto's S3 server on loopback) vs local disk,
at the demo model size and at the XL/2 parameter count, side by side in one run.

    python -m benchmarks.checkpoint_store [--sizes tiny,XL/2] [--rounds 3] [--smoke]

A checkpoint is what training/finetune writes (training/checkpoint.py): model + EMA weights (safetensors)
and trainer.pt with an AdamW state (exp_avg, exp_avg_sq per parameter), random values of the named
size's shapes (training/model.py `DiT_models`; XL/2: 610.9M parameters, so ~2.4 GB per fp32 copy and
~9.8 GB per checkpoint: the machine needs about three times that in memory). Each round saves one
checkpoint to each side and loads it back as a resume does (`checkpoint.load_resumable`), the side
that goes first alternating between rounds; `keep=1`, so each save also deletes the previous round's
checkpoint, as a running job does. Save on disk: the temp folder fsynced and renamed; on the store:
written to a local temp folder, uploaded, marker last. Load from the store: each file downloaded to a
local temp file, then read. The server runs in this process (its CPU time competes with the client).
Prints median (min-max) seconds and GB/s; `--smoke` runs the demo size and S/2, one round. Writes
benchmarks/results/checkpoint_store.md (not with --smoke).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.curation_tars_bucket import BENCH_CREDENTIALS, CountingS3
from benchmarks.rounds import spread

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "checkpoint_store.md"


def random_checkpoint(size: str) -> tuple[dict, dict, dict, int]:
    """(model weights, EMA weights, trainer state with an AdamW state, parameter count) of a named size."""
    from training.model import DiT_models

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in DiT_models[size]().state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    model = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    ema = {k: v + 0.01 for k, v in model.items()}
    state = {
        i: {"step": torch.tensor(1.0), "exp_avg": v * 0.1, "exp_avg_sq": v * v} for i, v in enumerate(model.values())
    }
    group = {"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False}
    optimizer = {"state": state, "param_groups": [{**group, "params": list(state)}]}
    trainer = {"optimizer": optimizer, "rng": [], "layout": [1, 1], "data_epoch": 0, "stage": "bench"}
    return model, ema, trainer, sum(v.numel() for v in model.values())


def one_side(run, step: int, ckpt: tuple[dict, dict, dict, int]) -> tuple[float, float, int]:
    """(save seconds, load seconds, bytes) of one checkpoint into run folder `run` (a Loc)."""
    from training import checkpoint

    model, ema, trainer, _ = ckpt
    t0 = time.perf_counter()
    folder = checkpoint.save(run, step, model, ema, trainer, keep=1)
    t1 = time.perf_counter()
    found = checkpoint.load_resumable(run, ema=True)
    t2 = time.perf_counter()
    assert found is not None and found[3]["step"] == step
    size = sum(f.size() for f in folder.iterdir())
    del found
    return t1 - t0, t2 - t1, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="tiny,XL/2", help="named DiT sizes (training/model.py), comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny and S/2, 1 round; writes no results file")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.rounds = "tiny,S/2", 1
    os.environ.update(BENCH_CREDENTIALS)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    s3 = CountingS3()
    os.environ["AWS_ENDPOINT_URL"] = s3.url
    tmp = Path(tempfile.mkdtemp(prefix="bench-checkpoint-store-"))
    rows = []
    try:
        import s3fs

        from shards import storage

        s3fs.S3FileSystem(endpoint_url=s3.url, skip_instance_cache=True).mkdir("bench")
        for size in args.sizes.split(","):
            ckpt = random_checkpoint(size)
            sides = {
                "disk": storage.resolve(tmp / size.replace("/", "_")),
                "store": storage.resolve(f"s3://bench/{size}"),
            }
            times: dict[str, dict[str, list[float]]] = {s: {"save": [], "load": []} for s in sides}
            nbytes = 0
            for r in range(args.rounds):
                order = list(sides) if r % 2 == 0 else list(sides)[::-1]  # who goes first alternates
                for side in order:
                    save, load, nbytes = one_side(sides[side], r + 1, ckpt)
                    times[side]["save"].append(save)
                    times[side]["load"].append(load)
                    print(f"{size} round {r + 1} {side}: save {save:.2f} s, load {load:.2f} s", flush=True)
            rows.append((size, ckpt[3], nbytes, times))
            del ckpt
    finally:
        s3.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "| size | parameters | checkpoint | side | save s | save GB/s | resume (load) s | load GB/s |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for size, params, nbytes, times in rows:
        for side, t in times.items():
            rate = lambda xs: [nbytes / x / 1e9 for x in xs]
            cells = [spread(t["save"], "{:.2f}"), spread(rate(t["save"]), "{:.3f}")]
            cells += [spread(t["load"], "{:.2f}"), spread(rate(t["load"]), "{:.3f}")]
            lines.append(
                f"| {size} | {params / 1e6:.1f}M | {nbytes / 1e9:.2f} GB | {side} | " + " | ".join(cells) + " |"
            )
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        head = (
            f"# checkpoint_store ({args.rounds} rounds, median (min-max); {platform.node()}, {os.cpu_count()} CPUs)\n\n"
        )
        RESULTS.write_text(head + " ".join(sys.argv) + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
