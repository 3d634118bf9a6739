"""Tiny ENCDIRs for the trainer tests, written with the real shard writer (shards/encoded.py).

Not made by `encoding/encode` (that needs Ray and seconds per 1K image through the tiny VAE): the
tensors are random but every file, name and field is the real format, so the real loader reads
them. Buckets are small for every tier (the model is multi-scale from 512 up), so a 4K stage
runs in a fraction of a second: the bucket labels are the only thing that is not realistic.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from shards import encoded

T5_DIM = 32  # the tiny T5's d_model = the tiny DiT's caption_channels
MAX_LENGTH = 300


def write(
    encdir: Path,
    tier: str,
    buckets: dict[tuple[int, int], int],
    seed: int = 0,
    latent_channels: int = 4,
    nan_key: str | None = None,
) -> Path:
    """ENCDIR with `count` samples per (h, w) pixel bucket; `nan_key`: that sample's latent mean is NaN."""
    gen = torch.Generator().manual_seed(seed)
    fp, n = "e" * 16, 0
    for (h, w), count in buckets.items():
        writer = encoded.BucketWriter(encdir, (h, w), fp, shard_bytes=20_000)
        for _ in range(count):
            key = f"{tier}-{n:05d}"
            n += 1
            feats = {"recaption": torch.randn(4 + n % 7, T5_DIM, generator=gen)}
            if n % 2:
                feats["original"] = torch.randn(3, T5_DIM, generator=gen)
            mean = torch.randn(latent_channels, h // 8, w // 8, generator=gen) * 4  # ~unit after x 0.13
            if key == nan_key:
                mean[0, 0, 0] = float("nan")
            std = torch.full_like(mean, 0.1)
            meta = {
                "key": key,
                "bucket": f"{h / w:.2f}",
                "bucket_hw": [h, w],
                "size": [h, w],
                "resized": [h, w],
                "crop_box": [0, 0, w, h],
                "fingerprint": fp,
                "format_version": encoded.FORMAT_VERSION,
                "captions": {"recaption": f"caption {key}", **({"original": f"alt {key}"} if n % 2 else {})},
                "t5_lengths": {k: len(v) for k, v in feats.items()},
                "source": "00000.tar",
            }
            row = dict(
                key=key,
                status="kept",
                reason="",
                bucket=meta["bucket"],
                bucket_h=h,
                bucket_w=w,
                width=w,
                height=h,
                t5_len_recaption=len(feats["recaption"]),
                t5_len_original=len(feats.get("original", [])),
                source="00000.tar",
                fingerprint=fp,
            )
            writer.write(meta, encoded.pack_t5(feats), encoded.pack_vae(mean, std, 0.13025), row)
        writer.close()
    save_file({"y_embedding": torch.randn(MAX_LENGTH, T5_DIM, generator=gen)}, str(encdir / "null_caption.safetensors"))
    encoded.write_info(
        encdir,
        dict(
            fingerprint=fp,
            tier=tier,
            table=tier,
            max_length=MAX_LENGTH,
            t5_dim=T5_DIM,
            scaling_factor=0.13025,
            latent_channels=latent_channels,
            null_caption="null_caption.safetensors",
        ),
    )
    return encdir


# Per tier: the square bucket of a single-scale 256 stage plus one non-square bucket it must skip;
# small buckets from 512 up.
TIER_BUCKETS = {
    "256": {(256, 256): 6, (240, 272): 3},
    "512": {(64, 64): 6, (48, 80): 4},
    "1k": {(64, 64): 4, (80, 48): 4},
    "2k": {(48, 48): 4},
    "4k": {(48, 48): 4},
}


def write_all(root: Path) -> dict[str, Path]:
    """One ENCDIR per tier under `root`: {"256": root/enc-256, ...}."""
    out = {}
    for tier, buckets in TIER_BUCKETS.items():
        (root / f"enc-{tier}").mkdir(parents=True, exist_ok=True)
        out[tier] = write(root / f"enc-{tier}", tier, buckets)
    return out


def args(stage: str, data: Path, runs: Path, *extra: str, batch: int = 2, steps: int = 2) -> list[str]:
    """finetune arguments for a quick CPU run: demo profile, tiny batches, no sample grids."""
    return [
        "--stage",
        stage,
        "--data",
        str(data),
        "--profile",
        "demo",
        "--max-steps",
        str(steps),
        "--set",
        f"training.out={runs}",
        "--set",
        "training.sample_every=0",
        "--set",
        "training.log_every=1",
        "--set",
        f"training.stages.{stage}.batch_size={batch}",
        *extra,
    ]


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """training/finetune under `torch.distributed.run --standalone` with `nproc` gloo ranks (one thread each)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        + ["training/finetune", *argv],
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
