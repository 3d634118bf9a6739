"""Finding what a run produced: the `--run RUNDIR | --ckpt FILE` flags, a run's newest weights, the
position setup of its stage, and a ready `PixArtSigma` built from them.

A run folder's layout is `training/checkpoint.py`'s; `training/convert.py` reads the weight files.
"""
from __future__ import annotations

from pathlib import Path

import torch

from shards.errors import SigmaError
from training import checkpoint
from training.convert import infer_arch, load_checkpoint, load_into


def add_source_args(p) -> None:
    """`--run RUNDIR | --ckpt FILE`, the weights training/sample and training/export read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: its newest checkpoint (EMA preferred); the folder name picks the stage")
    src.add_argument("--ckpt", help="a checkpoint: our .safetensors, an official .pth, or a diffusers folder")


def source_checkpoint(args) -> Path:
    """The weights file or folder that `add_source_args`' flags name."""
    return Path(args.ckpt) if args.ckpt else find_run_checkpoint(args.run)


def find_run_checkpoint(run: str | Path) -> Path:
    """The newest complete checkpoint of a run folder (`checkpoint.latest`): its EMA weights if saved."""
    run = Path(run)
    if not run.is_dir():
        raise SigmaError(f"{run}: run folder not found")
    newest = checkpoint.latest(run)
    if newest is None:
        raise SigmaError(f"{run}: no checkpoint in the run folder (expected {checkpoint.folder(run).name}/step-*/)")
    ema = newest / checkpoint.EMA
    return ema if ema.exists() else newest / checkpoint.MODEL


def position_setup(stage=None) -> dict:
    """`input_size` / `pe_interpolation` / `multi_scale` of a stage (a `common.config.Stage`).

    Without a stage: the span every official stage uses (base_size / pe_interpolation = 32, i.e.
    latent 64 at pe 1.0), which gives the same embedding as any of them at every size.
    """
    if stage is None:
        return dict(input_size=64, pe_interpolation=1.0, multi_scale=True)
    from shards.buckets import TIER_TABLES

    resolution = int(TIER_TABLES.get(stage.tier, stage.tier))
    return dict(input_size=resolution // 8, pe_interpolation=stage.pe_interpolation, multi_scale=stage.multi_scale)


def load_model(path: str | Path, size: str, **position) -> "torch.nn.Module":
    """A `PixArtSigma` shaped like the checkpoint's weights (num_heads from the named `size`)."""
    from training.model import DiT_models, PixArtSigma

    sd = load_checkpoint(path)
    arch = infer_arch(sd)
    if size not in DiT_models:
        raise SigmaError(f"models.dit: unknown size {size!r}; choose one of {list(DiT_models)}")
    with torch.device("meta"):
        named = DiT_models[size]()
    if named.hidden_size != arch["hidden_size"]:
        raise SigmaError(f"{path}: hidden size {arch['hidden_size']} does not match models.dit={size} "
                              f"({named.hidden_size})")
    model = PixArtSigma(num_heads=named.num_heads, **{**arch, **position})
    load_into(model, sd)
    return model.eval()


