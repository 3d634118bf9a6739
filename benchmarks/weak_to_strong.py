"""Weak-to-strong at toy scale: the tiny DiT on CPU, data encoded by this project's T5 + VAE functions.

    .venv/bin/python -m benchmarks.weak_to_strong [--steps 60] [--images 24]

Data: `demo.images.render` pictures, encoded with the tiny T5 (`encoders.t5`) and tiny VAE
(`encoders.vae`) into real ENCDIRs (`shards.encoded.BucketWriter`) at 256 and 512 (square buckets;
no Ray). Every run is the real `training/finetune` loop (`training.finetune.main`). Measured:

1. 256 -> 512 with PE interpolation (pe 0.5 -> 1.0: same position span) vs without (pe kept 0.5:
   the 512 grid runs past the positions seen at 256): held-out loss after the same steps.
2. KV compression switch-on (layers 2, 3 of 4, r = 2) on the 512 model: loss right after enabling
   with the average-init conv vs a random-init conv, and after the same fine-tuning steps.
   Both arms are then fine-tuned for the same steps (the random arm starts from a checkpoint whose
   convs were reset), so "recovers faster with average init" is measured, not assumed.
3. 512 fine-tuned from the 256 checkpoint vs 512 from scratch: steps to reach the scratch run's
   final loss.
4. (d) VAE swap: the 256 model (trained on latents of the tiny VAE) continued on latents of a
   second tiny VAE (same SDXL layout, other random weights) vs training from scratch on the second
   VAE: held-out loss curves (a separate held-out set, second VAE) and steps to reach scratch's final loss.

Every arm runs once per seed (`--seeds`: the training seed of every run); tables give the mean
and the min-max spread over seeds.

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
CAPTIONS = [
    "a colourful abstract composition",
    "landscape wallpaper with shapes",
    "portrait poster design",
    "high resolution digital art",
    "wide banner artwork",
    "thumbnail picture",
]


def encode(
    encdir: Path, tier: str, side: int, n: int, models: Path, vae_dir: Path | None = None, first: int = 0
) -> Path:
    """n rendered pictures (render(first..first+n-1)) -> ENCDIR at one square bucket, through the
    project's T5 and VAE code (`vae_dir`: another VAE than the tiny one)."""
    from safetensors.torch import save_file

    from demo.images import render
    from encoders import t5 as t5_mod
    from encoders import vae as vae_mod
    from shards import encoded

    tok, enc = t5_mod.load_tokenizer(models / "t5"), t5_mod.load_t5(models / "t5", "float32")
    vae = vae_mod.load_vae(vae_dir or models / "vae", "float32")
    caps = [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]
    feats, _ = t5_mod.encode_captions(tok, enc, caps, max_length=300)
    fp = "b" * 16
    writer = encoded.BucketWriter(encdir, (side, side), fp, shard_bytes=200_000)
    for i in range(n):
        pixels, _ = vae_mod.preprocess(render(first + i, side + 64, side + 32), (side, side))
        mean, std = vae_mod.encode_latent_dist(vae, pixels[None])
        key = f"{tier}-{i:05d}"
        meta = {
            "key": key,
            "bucket": "1.0",
            "bucket_hw": [side, side],
            "size": [side + 32, side + 64],
            "resized": [side, side],
            "crop_box": [0, 0, side, side],
            "captions": {"recaption": caps[i]},
            "t5_lengths": {"recaption": len(feats[i])},
            "source": "render",
            "fingerprint": fp,
            "format_version": encoded.FORMAT_VERSION,
        }
        row = dict(
            key=key,
            status="kept",
            reason="",
            bucket="1.0",
            bucket_h=side,
            bucket_w=side,
            width=side + 64,
            height=side + 32,
            t5_len_recaption=len(feats[i]),
            t5_len_original=0,
            source="render",
            fingerprint=fp,
        )
        writer.write(meta, encoded.pack_t5({"recaption": feats[i]}), encoded.pack_vae(mean[0], std[0], 0.13025), row)
    writer.close()
    save_file({"y_embedding": t5_mod.null_caption_embedding(tok, enc, 300)}, str(encdir / "null_caption.safetensors"))
    encoded.write_info(
        encdir,
        dict(
            fingerprint=fp,
            tier=tier,
            table=tier,
            max_length=300,
            t5_dim=32,
            scaling_factor=vae_mod.scaling_factor(vae),
            latent_channels=4,
            null_caption="null_caption.safetensors",
        ),
    )
    return encdir


def finetune(
    stage: str,
    data: Path,
    out: Path,
    steps: int,
    *sets: str,
    init: Path | None = None,
    seed: int = 0,
    every: int | None = None,
) -> list[float]:
    """One real finetune run (a checkpoint every `every` steps, all kept); returns its per-step training losses."""
    from training import finetune as finetune_cmd

    argv = [
        "--stage",
        stage,
        "--data",
        str(data),
        "--out",
        str(out),
        "--profile",
        "demo",
        "--max-steps",
        str(steps),
        "--set",
        "training.sample_every=0",
        "--set",
        "training.log_every=1",
        "--set",
        "training.keep_checkpoints=1000",
        "--set",
        f"training.checkpoint_every={every or steps}",
        "--set",
        f"training.stages.{stage}.batch_size=4",
        "--set",
        f"training.stages.{stage}.seed={seed}",
        "--set",
        f"training.stages.{stage}.warmup_steps=5",
        *[a for s in sets for a in ("--set", s)],
    ]
    finetune_cmd.main(argv + (["--init", str(init)] if init else []))
    return [float(x) for x in re.findall(r"step \d+/\d+ loss ([\d.]+)", (out / "log.txt").read_text())]


@torch.no_grad()
def heldout_loss(weights: Path, data: Path, pe: float, kv_layers=(), random_kv: bool = False, side: int = 512) -> float:
    """Mean loss of a checkpoint on every sample of `data` (side x side) at fixed t and noise."""
    from shards import loader
    from training import checkpoint, stages
    from training.diffusion import GaussianDiffusion
    from training.model import DiT_models

    torch.manual_seed(0)
    model = DiT_models["tiny"](input_size=side // 8, pe_interpolation=pe, kv_compress_layers=kv_layers)
    stages.load_init(model, checkpoint.load_weights(weights), str(weights))
    if random_kv:  # the ablation: a fresh conv (PyTorch default init) instead of the average
        reset_kv(model, kv_layers)
    model.set_null_caption(loader.null_caption(data))
    model.eval()
    diffusion, gen, total, n = GaussianDiffusion(), torch.Generator().manual_seed(1), 0.0, 0
    for batch in loader.make_loader(data, 4, 300, 0.0, seed=0, num_workers=0, resample=False, keep_partial=True):
        B = batch["latent"].shape[0]
        for _ in range(4):  # 4 timesteps per sample
            t = torch.randint(0, 1000, (B,), generator=gen)
            noise = torch.randn(batch["latent"].shape, generator=gen)
            out = diffusion.training_losses(
                model, batch["latent"], t, dict(y=batch["y"], mask=batch["mask"]), None, noise
            )
            total, n = total + out["loss"].sum().item(), n + B
    return total / n


def reset_kv(model, kv_layers) -> None:
    for i in kv_layers:
        model.blocks[i].attn.sr.reset_parameters()


def random_kv_init(src: Path, out: Path, kv_layers) -> Path:
    """`src` plus PyTorch-default KV convs: the starting weights of the random-init fine-tuning arm."""
    from safetensors.torch import save_file

    from training import checkpoint, stages
    from training.model import DiT_models

    torch.manual_seed(0)
    model = DiT_models["tiny"](input_size=64, pe_interpolation=1.0, kv_compress_layers=kv_layers)
    stages.load_init(model, checkpoint.load_weights(src), str(src))
    reset_kv(model, kv_layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("y_embedding")}, str(out))
    return out


def curve(rundir: Path, data: Path, start: float | None = None) -> list[tuple[int, float]]:
    """Held-out loss (256, pe 0.5) at every kept checkpoint of a run, after (0, start) if given."""
    from training import checkpoint

    points = [(0, start)] if start is not None else []
    return points + [
        (s, heldout_loss(checkpoint.step_dir(rundir, s) / checkpoint.MODEL, data, 0.5, side=256))
        for s in checkpoint.list_steps(rundir)
    ]


def one_seed(seed: int, S: int, enc: dict, work: Path, vae2: Path) -> dict:
    """Every arm once with training seed `seed`; returns the numbers the report reads."""
    from training import checkpoint

    last = lambda run: checkpoint.latest(run) / checkpoint.MODEL
    root, kv = ["training.stages.512.parent=null"], (2, 3)
    r = {}
    finetune("256", enc["256"], work / "r256", 2 * S, seed=seed)
    r["interp"] = finetune(
        "512",
        enc["512"],
        work / "r512-interp",
        S,
        *root,
        "training.stages.512.pe_interpolation=1.0",
        init=last(work / "r256"),
        seed=seed,
    )
    r["nointerp"] = finetune(
        "512",
        enc["512"],
        work / "r512-nointerp",
        S,
        *root,
        "training.stages.512.pe_interpolation=0.5",
        init=last(work / "r256"),
        seed=seed,
    )
    r["scratch"] = finetune("512", enc["512"], work / "r512-scratch", S, *root, seed=seed)
    r["h"] = {
        name: heldout_loss(last(work / f"r512-{name}"), enc["512"], pe)
        for name, pe in (("interp", 1.0), ("nointerp", 0.5), ("scratch", 1.0))
    }
    r["h0"] = {
        name: heldout_loss(last(work / "r256"), enc["512"], pe) for name, pe in (("interp", 1.0), ("nointerp", 0.5))
    }

    src = last(work / "r512-interp")
    r["kv0"] = {
        "none": heldout_loss(src, enc["512"], 1.0),
        "average": heldout_loss(src, enc["512"], 1.0, kv),
        "random": heldout_loss(src, enc["512"], 1.0, kv, random_kv=True),
    }
    kv_sets = (*root, "training.stages.512.kv_compress=true", "training.stages.512.kv_compress_layers=[2, 3]")
    r["kv_avg"] = finetune("512", enc["512"], work / "kv-average", S // 2, *kv_sets, init=src, seed=seed)
    r["kv_rand"] = finetune(
        "512",
        enc["512"],
        work / "kv-random",
        S // 2,
        *kv_sets,
        seed=seed,
        init=random_kv_init(src, work / "kv-random-init.safetensors", kv),
    )
    r["kv_after"] = {arm: heldout_loss(last(work / f"kv-{arm}"), enc["512"], 1.0, kv) for arm in ("average", "random")}

    vae_sets = ("training.stages.vae.multi_scale=true", f"training.stages.vae.vae={vae2}")
    every = max(1, S // 6)
    finetune("vae", enc["256-vae2"], work / "vae-swap", S, *vae_sets, init=last(work / "r256"), seed=seed, every=every)
    finetune(
        "vae",
        enc["256-vae2"],
        work / "vae-scratch",
        S,
        *vae_sets,
        "training.stages.vae.parent=null",
        seed=seed,
        every=every,
    )
    r["swap"] = curve(
        work / "vae-swap",
        enc["256-vae2-heldout"],
        heldout_loss(last(work / "r256"), enc["256-vae2-heldout"], 0.5, side=256),
    )
    r["vae_scratch"] = curve(work / "vae-scratch", enc["256-vae2-heldout"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="steps per training run")
    ap.add_argument("--images", type=int, default=24, help="pictures per resolution")
    ap.add_argument("--seeds", default="0,1,2", help="training seeds, one full set of runs each")
    ap.add_argument("--work", default="/tmp/sigmaforge-w2s", help="scratch folder")
    args = ap.parse_args()
    from demo import tiny_models
    from encoders import vae as vae_mod

    t0 = time.time()
    work, S, seeds = Path(args.work), args.steps, [int(s) for s in args.seeds.split(",")]
    models = tiny_models.build(ROOT / ".cache" / "tiny")
    vae2 = work / "vae2"
    if not (vae2 / "config.json").exists():
        vae_mod.build_tiny(vae2, seed=1)  # the same SDXL layout, other random weights
    enc = {}
    for name, tier, side, vae_dir, first, n in (
        ("256", "256", 256, None, 0, args.images),
        ("512", "512", 512, None, 0, args.images),
        ("256-vae2", "256", 256, vae2, 0, args.images),
        ("256-vae2-heldout", "256", 256, vae2, 1000, max(4, args.images // 3)),
    ):
        enc[name] = work / f"enc-{name}"
        if not (enc[name] / "info.json").exists():
            encode(enc[name], tier, side, n, models, vae_dir, first)
    results = [one_seed(seed, S, enc, work / f"seed{seed}", vae2) for seed in seeds]
    write_report(args, S, seeds, results, time.time() - t0)


def smooth(xs: list[float]) -> list[float]:
    return [sum(xs[max(0, i - 4) : i + 1]) / len(xs[max(0, i - 4) : i + 1]) for i in range(len(xs))]


def reach(xs: list[float], target: float) -> int | None:
    """First step whose 5-step running mean of the training loss is at or below `target`."""
    return next((i + 1 for i, v in enumerate(smooth(xs)) if v <= target), None)


def reach_curve(points: list[tuple[int, float]], target: float) -> int | None:
    """First checkpoint step whose held-out loss is at or below `target`."""
    return next((s for s, v in points if v <= target), None)


def spread(values) -> str:
    """'mean [min, max]' over seeds ('-' for a value never reached)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "not reached"
    miss = len(values) - len(vals)
    text = f"{sum(vals) / len(vals):.4g} [{min(vals):.4g}, {max(vals):.4g}]"
    return text + (f" ({miss} not reached)" if miss else "")


def _mean_curve(curves: list[list[float]]) -> list[float]:
    return [sum(c[i] for c in curves) / len(curves) for i in range(min(map(len, curves)))]


def write_report(args, S, seeds, results, seconds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = results
    col = lambda f: [f(r) for r in R]
    fig, ax = plt.subplots(1, 3, figsize=(16, 4))
    for name, key in (
        ("512 from 256, PE interpolated (pe 1.0)", "interp"),
        ("512 from 256, no interpolation (pe 0.5)", "nointerp"),
        ("512 from scratch", "scratch"),
    ):
        xs = _mean_curve([r[key] for r in R])
        ax[0].plot(range(1, len(xs) + 1), xs, label=name)
    ax[0].set(title=f"training loss at 512 (mean of {len(R)} seeds)", xlabel="step", ylabel="loss")
    ax[0].legend(fontsize=8)
    for name, key in (("average init", "kv_avg"), ("random init", "kv_rand")):
        xs = _mean_curve([r[key] for r in R])
        ax[1].plot(range(1, len(xs) + 1), xs, label=f"KV compression on, {name}")
    ax[1].axhline(
        sum(col(lambda r: r["kv0"]["none"])) / len(R), ls="--", c="gray", label="held-out loss before switch-on"
    )
    ax[1].set(title="after switching on KV compression (training loss)", xlabel="step", ylabel="loss")
    ax[1].legend(fontsize=8)
    for name, key, c in (
        ("from the 256 model (VAE 1) on VAE 2", "swap", "C0"),
        ("from scratch on VAE 2", "vae_scratch", "C3"),
    ):
        for i, r in enumerate(R):
            steps, vals = zip(*r[key])
            ax[2].plot(steps, vals, c=c, alpha=0.8, marker=".", label=name if i == 0 else None)
    ax[2].set(title="(d) VAE swap: held-out loss on VAE-2 latents", xlabel="step", ylabel="held-out loss")
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "weak_to_strong.png", dpi=100)

    final = col(lambda r: sum(r["scratch"][-5:]) / 5)
    vae_final = col(lambda r: r["vae_scratch"][-1][1])
    md = (
        f"""# Weak-to-strong at toy scale

`python -m benchmarks.weak_to_strong --steps {S} --images {args.images} --seeds {args.seeds}`: tiny DiT (hidden 64,
depth 4), CPU (2 shared cores), {args.images} rendered pictures per resolution encoded with the tiny T5 + VAE, batch 4,
AdamW lr 1e-3 (demo profile), every run through `training/finetune`'s loop. 256 stage: {2 * S} steps from
scratch (pe 0.5). Held-out loss: every sample of the evaluated set at 4 fixed (t, noise) each.
{len(seeds)} seeds (the training seed of every run); each cell is the mean [min, max] over seeds.
Total wall time {seconds:.0f} s. Toy scale and random-weight encoders: read the differences, not the values.

## 1. Resolution growth 256 -> 512

| 512 run ({S} steps) | held-out loss at start | held-out loss after | mean train loss, last 10 steps |
| --- | ---: | ---: | ---: |
| from 256, PE interpolation (pe 0.5 -> 1.0) | {spread(col(lambda r: r["h0"]["interp"]))} | {spread(col(lambda r: r["h"]["interp"]))} | {spread(col(lambda r: sum(r["interp"][-10:]) / 10))} |
| from 256, no interpolation (pe stays 0.5) | {spread(col(lambda r: r["h0"]["nointerp"]))} | {spread(col(lambda r: r["h"]["nointerp"]))} | {spread(col(lambda r: sum(r["nointerp"][-10:]) / 10))} |
| from scratch | - | {spread(col(lambda r: r["h"]["scratch"]))} | {spread(col(lambda r: sum(r["scratch"][-10:]) / 10))} |

## 2. KV compression switch-on (layers 2, 3; r = 2) on the 512 model

Both arms fine-tuned for the same {S // 2} steps from the same 512 checkpoint.

| conv init | held-out loss right after switch-on | after {S // 2} fine-tuning steps | mean train loss, first 5 steps |
| --- | ---: | ---: | ---: |
| no compression (before) | {spread(col(lambda r: r["kv0"]["none"]))} | - | - |
| average (1/r², PixArt-Σ) | {spread(col(lambda r: r["kv0"]["average"]))} | {spread(col(lambda r: r["kv_after"]["average"]))} | {spread(col(lambda r: sum(r["kv_avg"][:5]) / 5))} |
| random (PyTorch default) | {spread(col(lambda r: r["kv0"]["random"]))} | {spread(col(lambda r: r["kv_after"]["random"]))} | {spread(col(lambda r: sum(r["kv_rand"][:5]) / 5))} |

## 3. Fine-tuning from 256 vs training 512 from scratch

Steps until the 5-step running mean of the training loss reaches the scratch run's final value
({spread(final)} after {S} steps): from 256 with PE interpolation **{spread([reach(r["interp"], f) for r, f in zip(R, final)])}**,
without interpolation **{spread([reach(r["nointerp"], f) for r, f in zip(R, final)])}**, from scratch **{S}**.

## 4. (d) VAE swap at 256

The 256 model ({2 * S} steps on latents of VAE 1) continued for {S} steps on latents of VAE 2 (same tiny SDXL
layout, other random weights), against {S} steps from scratch on VAE 2. Held-out: {max(4, args.images // 3)} other
pictures encoded with VAE 2, loss at every {max(1, S // 6)}-step checkpoint.

| run on VAE 2 | held-out loss at step 0 | held-out loss after {S} steps | checkpoint step reaching scratch's final held-out loss |
| --- | ---: | ---: | ---: |
| from the 256 model (VAE 1) | {spread(col(lambda r: r["swap"][0][1]))} | {spread(col(lambda r: r["swap"][-1][1]))} | {spread([reach_curve(r["swap"], f) for r, f in zip(R, vae_final)])} |
| from scratch | - | {spread(vae_final)} | {S} |

Held-out curves per seed (step: loss):

"""
        + "\n".join(
            f"- seed {s}: swap "
            + ", ".join(f"{st}: {v:.4f}" for st, v in r["swap"])
            + "; scratch "
            + ", ".join(f"{st}: {v:.4f}" for st, v in r["vae_scratch"])
            for s, r in zip(seeds, R)
        )
        + """

![curves](weak_to_strong.png)
"""
    )
    (OUT / "weak_to_strong.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
