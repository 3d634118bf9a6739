"""Finding what a run produced: the `--run RUNDIR | --ckpt FILE` flags, a run's newest weights, the
model it trained (its `run.json`), and a ready `PixArtSigma` built from them.

A run folder knows its model: training/finetune records the architecture (`model.size` and the
stage's model settings) in RUNDIR/run.json, so sample, export and evaluate take the size and the
position setup from there; a checkpoint file inside a run folder counts as that run. A bare
checkpoint gets the released 1024 setup (`DEFAULT_POSITION`), whose position grid spans the same
range as every official stage, unless a `--stage` says otherwise.

A run folder's layout is `training/checkpoint.py`'s; `training/convert.py` reads the weight files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from shards.errors import SigmaError
from training import checkpoint
from training.convert import infer_arch, load_checkpoint, load_into
from training.model import RELEASED_1024

RUN_INFO = "run.json"
DEFAULT_POSITION = {**RELEASED_1024, "multi_scale": True}  # a bare checkpoint: PixArt-Sigma-XL-2-1024-MS
POSITION_KEYS = ("input_size", "pe_interpolation", "multi_scale")


@dataclass
class Source:
    """The weights to use and the model they belong to."""

    checkpoint: Path
    run: Path | None  # the run folder the weights come from, if any
    size: str  # named DiT size (`models.dit`)
    position: dict  # input_size / pe_interpolation / multi_scale
    stage: str | None  # the run's stage name, or the --stage given


def add_source_args(p) -> None:
    """`--run RUNDIR | --ckpt FILE`, the weights training/sample and training/export read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: its newest checkpoint (EMA preferred) and the model in its run.json")
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


def run_of(ckpt: Path) -> Path | None:
    """The run folder holding checkpoint file `ckpt` (RUNDIR/checkpoints/step-*/x.safetensors), if any."""
    parts = ckpt.resolve().parents
    if len(parts) >= 3 and parts[1].name == "checkpoints" and (parts[2] / RUN_INFO).exists():
        return parts[2]
    return None


def run_for(path: Path) -> Path | None:
    """The run folder of a run folder or of a checkpoint file inside one."""
    path = Path(path)
    return path if (path / RUN_INFO).exists() else run_of(path)


def recorded(path: Path) -> tuple[str, dict] | None:
    """(size, position setup) that the run of `path` (a run folder or a checkpoint in one) recorded."""
    run = run_for(path)
    model = run_model(run) if run else None
    return (model["size"], {k: model[k] for k in POSITION_KEYS}) if model else None


def run_model(run: Path) -> dict | None:
    """The `model` entry of RUNDIR/run.json (size + model settings), None for a run without one."""
    try:
        info = json.loads((Path(run) / RUN_INFO).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SigmaError(f"{run / RUN_INFO}: unreadable ({type(e).__name__})") from None
    model = info.get("model") if isinstance(info, dict) else None
    return model if isinstance(model, dict) and "size" in model else None


def resolve_source(args, cfg, stage_flag: str | None = None, require_position: bool = False) -> Source:
    """Weights, size and position setup from --run/--ckpt, the run's run.json and an optional --stage.

    `stage_flag` overrides the run's position setup only where they agree (else a one-line error);
    `require_position`: a bare checkpoint needs --stage (export records the setup for good).
    """
    stages = cfg.training.stages
    if stage_flag is not None and stage_flag not in stages:
        raise SigmaError(f"--stage {stage_flag}: no such stage; choose one of {sorted(stages)}")
    ckpt = source_checkpoint(args)
    run = Path(args.run) if args.run else run_of(ckpt)
    found = recorded(run) if run else None
    flagged = position_setup(stages[stage_flag]) if stage_flag else None
    if found is not None:
        size, position = found
        if flagged is not None and flagged != position:
            raise SigmaError(f"--stage {stage_flag}: {position_text(flagged)}, but {run} was trained with "
                             f"{position_text(position)} (run.json); drop --stage")
        return Source(ckpt, run, size, position, stage_flag or run.name)
    by_name = run.name if run and run.name in stages else None
    stage = stage_flag or by_name
    if stage is None and require_position:
        raise SigmaError(f"--ckpt {ckpt}: not inside a run folder, so its position setup is unknown; pass "
                         f"--stage (one of {sorted(stages)})")
    position = position_setup(stages[stage]) if stage else dict(DEFAULT_POSITION)
    return Source(ckpt, run, cfg.models.dit, position, stage)


# The released checkpoints' names -> the position setup they were trained with.
RELEASED = {"256x256": dict(input_size=32, pe_interpolation=0.5, multi_scale=False),
            "512-MS": dict(input_size=64, pe_interpolation=1.0, multi_scale=True),
            "1024-MS": DEFAULT_POSITION, "2K-MS": dict(input_size=256, pe_interpolation=4.0, multi_scale=True)}


def known_position(weights: str | Path) -> dict | None:
    """The position setup starting weights were trained with: their run's run.json, a released
    checkpoint's name (PixArt-Sigma-XL-2-1024-MS.pth), else None (unknown)."""
    weights = Path(weights)
    found = recorded(weights)
    if found is not None:
        return found[1]
    return next((dict(p) for tag, p in RELEASED.items() if tag in weights.name), None)


def position_setup(stage) -> dict:
    """`input_size` / `pe_interpolation` / `multi_scale` of a stage (a `common.config.Stage`)."""
    from shards.buckets import TIER_TABLES

    resolution = int(TIER_TABLES.get(stage.tier, stage.tier))
    return dict(input_size=resolution // 8, pe_interpolation=stage.pe_interpolation, multi_scale=stage.multi_scale)


def position_text(position: dict) -> str:
    return (f"{position['input_size'] * 8} px, pe_interpolation {position['pe_interpolation']}"
            f"{'' if position['multi_scale'] else ', single-scale'}")


def position_for_size(position: dict, height: int, width: int) -> dict:
    """The setup to sample HxW with: a single-scale stage equals multi-scale at its own size."""
    if height != width or height != position["input_size"] * 8:
        return {**position, "multi_scale": True}
    return dict(position)


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
