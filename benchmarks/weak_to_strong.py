"""Weak-to-strong at toy scale: the tiny DiT on CPU, data encoded by this project's T5 + VAE functions.

    .venv/bin/python -m benchmarks.weak_to_strong [--steps 60] [--images 24]

Data: `demo.images.render` pictures, encoded with the tiny T5 (`encoders.t5`) and tiny VAE
(`encoders.vae`) into real ENCDIRs (`shards.encoded.BucketWriter`) at 256 and 512 (square buckets;
no Ray). Every run is the real `training/finetune` loop (`training.finetune.main`). Measured:

1. 256 -> 512 with PE interpolation (pe 0.5 -> 1.0: same position span) vs without (pe kept 0.5:
   the 512 grid runs past the positions seen at 256): held-out loss after the same steps.
2. KV compression switch-on (layers 2, 3 of 4, r = 2) on the 512 model: loss right after enabling
   with the average-init conv vs a random-init conv, and after the same fine-tuning steps.
3. 512 fine-tuned from the 256 checkpoint vs 512 from scratch: steps to reach the scratch run's
   final loss.

Held-out loss: fixed samples, t and noise (seeded), EMA-free raw weights, mean of `loss` (MSE + VLB).
Writes benchmarks/results/weak_to_strong.md and weak_to_strong.png.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"
CAPTIONS = ["a colourful abstract composition", "landscape wallpaper with shapes", "portrait poster design",
            "high resolution digital art", "wide banner artwork", "thumbnail picture"]


def encode(encdir: Path, tier: str, side: int, n: int, models: Path) -> Path:
    """n rendered pictures -> ENCDIR at one square bucket, through the project's T5 and VAE code."""
    from safetensors.torch import save_file

    from demo.images import render
    from encoders import t5 as t5_mod
    from encoders import vae as vae_mod
    from shards import encoded

    tok, enc = t5_mod.load_tokenizer(models / "t5"), t5_mod.load_t5(models / "t5", "float32")
    vae = vae_mod.load_vae(models / "vae", "float32")
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    feats, _ = t5_mod.encode_captions(tok, enc, caps, max_length=300)
    fp = "b" * 16
    writer = encoded.BucketWriter(encdir, (side, side), fp, shard_bytes=200_000)
    for i in range(n):
        pixels, _ = vae_mod.preprocess(render(i, side + 64, side + 32), (side, side))
        mean, std = vae_mod.encode_latent_dist(vae, pixels[None])
        key = f"{tier}-{i:05d}"
        meta = {"key": key, "bucket": "1.0", "bucket_hw": [side, side], "size": [side + 32, side + 64],
                "resized": [side, side], "crop_box": [0, 0, side, side], "captions": {"recaption": caps[i]},
                "t5_lengths": {"recaption": len(feats[i])}, "source": "render", "fingerprint": fp,
                "format_version": encoded.FORMAT_VERSION}
        row = dict(key=key, status="kept", reason="", bucket="1.0", bucket_h=side, bucket_w=side, width=side + 64,
                   height=side + 32, t5_len_recaption=len(feats[i]), t5_len_original=0, source="render", fingerprint=fp)
        writer.write(meta, encoded.pack_t5({"recaption": feats[i]}), encoded.pack_vae(mean[0], std[0], 0.13025), row)
    writer.close()
    save_file({"y_embedding": t5_mod.null_caption_embedding(tok, enc, 300)}, str(encdir / "null_caption.safetensors"))
    encoded.write_info(encdir, dict(fingerprint=fp, tier=tier, table=tier, max_length=300, t5_dim=32,
                                    scaling_factor=vae_mod.scaling_factor(vae), latent_channels=4,
                                    null_caption="null_caption.safetensors"))
    return encdir


def finetune(stage: str, data: Path, out: Path, steps: int, *sets: str, init: Path | None = None) -> list[float]:
    """One real finetune run; returns its per-step training losses."""
    from training import finetune

    argv = ["--stage", stage, "--data", str(data), "--out", str(out), "--profile", "demo", "--max-steps", str(steps),
            "--set", "training.sample_every=0", "--set", "training.log_every=1",
            "--set", f"training.checkpoint_every={steps}", "--set", f"training.stages.{stage}.batch_size=4",
            "--set", f"training.stages.{stage}.warmup_steps=5", *[a for s in sets for a in ("--set", s)]]
    finetune.main(argv + (["--init", str(init)] if init else []))
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([\d.]+)", (out / "log.txt").read_text())]


@torch.no_grad()
def heldout_loss(weights: Path, data: Path, pe: float, kv_layers=(), random_kv: bool = False) -> float:
    """Mean loss of a checkpoint on every sample of `data` at fixed t and noise."""
    from shards import loader
    from training import checkpoint, stages
    from training.diffusion import GaussianDiffusion
    from training.model import DiT_models

    torch.manual_seed(0)
    model = DiT_models["tiny"](input_size=64, pe_interpolation=pe, kv_compress_layers=kv_layers)
    stages.load_init(model, checkpoint.load_weights(weights), str(weights))
    if random_kv:  # the ablation: a fresh conv (PyTorch default init) instead of the average
        for i in kv_layers:
            model.blocks[i].attn.sr.reset_parameters()
    model.set_null_caption(loader.null_caption(data))
    model.eval()
    diffusion, gen, total, n = GaussianDiffusion(), torch.Generator().manual_seed(1), 0.0, 0
    for batch in loader.make_loader(data, 4, 300, 0.0, seed=0, num_workers=0, resample=False, keep_partial=True):
        B = batch["latent"].shape[0]
        for _ in range(4):  # 4 timesteps per sample
            t = torch.randint(0, 1000, (B,), generator=gen)
            noise = torch.randn(batch["latent"].shape, generator=gen)
            out = diffusion.training_losses(model, batch["latent"], t, dict(y=batch["y"], mask=batch["mask"]), None, noise)
            total, n = total + out["loss"].sum().item(), n + B
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per training run")
    ap.add_argument("--images", type=int, default=24, help="pictures per resolution")
    ap.add_argument("--work", default="/tmp/sigmaforge-w2s", help="scratch folder")
    args = ap.parse_args()
    from demo import tiny_models
    from training import checkpoint

    t0 = time.time()
    work, S = Path(args.work), args.steps
    models = tiny_models.build(ROOT / ".cache" / "tiny")
    enc = {}
    for tier, side in (("256", 256), ("512", 512)):
        enc[tier] = work / f"enc-{tier}"
        if not (enc[tier] / "info.json").exists():
            encode(enc[tier], tier, side, args.images, models)
    last = lambda run: checkpoint.latest(run) / checkpoint.MODEL  # noqa: E731
    root = ["training.stages.512.parent=null"]

    finetune("256", enc["256"], work / "r256", 2 * S)
    interp = finetune("512", enc["512"], work / "r512-interp", S, *root, "training.stages.512.pe_interpolation=1.0",
                      init=last(work / "r256"))
    nointerp = finetune("512", enc["512"], work / "r512-nointerp", S, *root, "training.stages.512.pe_interpolation=0.5",
                        init=last(work / "r256"))
    scratch = finetune("512", enc["512"], work / "r512-scratch", S, *root)
    h = {name: heldout_loss(last(work / f"r512-{name}"), enc["512"], pe)
         for name, pe in (("interp", 1.0), ("nointerp", 0.5), ("scratch", 1.0))}
    h0 = {name: heldout_loss(last(work / "r256"), enc["512"], pe) for name, pe in (("interp", 1.0), ("nointerp", 0.5))}

    src = last(work / "r512-interp")
    kv0 = {"none": heldout_loss(src, enc["512"], 1.0), "average": heldout_loss(src, enc["512"], 1.0, (2, 3)),
           "random": heldout_loss(src, enc["512"], 1.0, (2, 3), random_kv=True)}
    kv_sets = (*root, "training.stages.512.kv_compress=true", "training.stages.512.kv_compress_layers=[2, 3]")
    kv_avg = finetune("512", enc["512"], work / "kv-average", S // 2, *kv_sets, init=src)
    kv_after = {"average": heldout_loss(last(work / "kv-average"), enc["512"], 1.0, (2, 3))}

    smooth = lambda xs: [sum(xs[max(0, i - 4):i + 1]) / len(xs[max(0, i - 4):i + 1]) for i in range(len(xs))]  # noqa: E731
    reach = lambda xs: next((i + 1 for i, v in enumerate(smooth(xs)) if v <= smooth(scratch)[-1]), None)  # noqa: E731
    write_report(args, S, interp, nointerp, scratch, kv_avg, h, h0, kv0, kv_after, reach, time.time() - t0)


def write_report(args, S, interp, nointerp, scratch, kv_avg, h, h0, kv0, kv_after, reach, seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for name, xs in (("512 from 256, PE interpolated (pe 1.0)", interp), ("512 from 256, no interpolation (pe 0.5)", nointerp),
                     ("512 from scratch", scratch)):
        ax[0].plot(range(1, len(xs) + 1), xs, label=name)
    ax[0].set(title="training loss at 512", xlabel="step", ylabel="loss")
    ax[0].legend(fontsize=8)
    ax[1].plot(range(1, len(kv_avg) + 1), kv_avg, label="KV compression on (average init)")
    ax[1].axhline(kv0["none"], ls="--", c="gray", label="held-out loss before switch-on")
    ax[1].set(title="after switching on KV compression", xlabel="step", ylabel="loss")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "weak_to_strong.png", dpi=100)
    r_interp, r_no = reach(interp), reach(nointerp)
    md = f"""# Weak-to-strong at toy scale

`python -m benchmarks.weak_to_strong --steps {S} --images {args.images}`: tiny DiT (hidden 64, depth 4), CPU
(2 shared cores), {args.images} rendered pictures per resolution encoded with the tiny T5 + VAE, batch 4,
AdamW lr 1e-3 (demo profile), every run through `training/finetune`'s loop. 256 stage: {2 * S} steps from
scratch (single-scale, pe 0.5). Held-out loss: every sample of the 512 set at 4 fixed (t, noise) each.
Total wall time {seconds:.0f} s. Toy scale and random-weight encoders: read the differences, not the values.

## 1. Resolution growth 256 -> 512

| 512 run ({S} steps) | held-out loss at start | held-out loss after | mean train loss, last 10 steps |
| --- | ---: | ---: | ---: |
| from 256, PE interpolation (pe 0.5 -> 1.0) | {h0['interp']:.4f} | {h['interp']:.4f} | {sum(interp[-10:]) / 10:.4f} |
| from 256, no interpolation (pe stays 0.5) | {h0['nointerp']:.4f} | {h['nointerp']:.4f} | {sum(nointerp[-10:]) / 10:.4f} |
| from scratch | - | {h['scratch']:.4f} | {sum(scratch[-10:]) / 10:.4f} |

## 2. KV compression switch-on (layers 2, 3; r = 2) on the 512 model

| conv init | held-out loss right after switch-on | after {S // 2} fine-tuning steps |
| --- | ---: | ---: |
| no compression (before) | {kv0['none']:.4f} | - |
| average (1/r², PixArt-Σ) | {kv0['average']:.4f} | {kv_after['average']:.4f} |
| random (PyTorch default) | {kv0['random']:.4f} | not run |

## 3. Fine-tuning from 256 vs training 512 from scratch

Steps until the 5-step running mean of the training loss reaches the scratch run's final value
({sum(scratch[-5:]) / 5:.4f} after {S} steps): from 256 with PE interpolation **{r_interp}**, without
interpolation **{r_no}**, from scratch **{S}**.

![curves](weak_to_strong.png)
"""
    (OUT / "weak_to_strong.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
