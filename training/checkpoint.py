"""Run checkpoints: weights as safetensors, trainer state through torch.save/load(weights_only=True).

    RUNDIR/checkpoints/step-0000500/model.safetensors   the trained weights (what the next stage starts from)
                                    ema.safetensors     the EMA copy (what sampling and export prefer)
                                    trainer.pt          step, optimizer, RNG states per rank, data position
    RUNDIR/checkpoints/.partial/                        a checkpoint being written

A checkpoint is written into `.partial/`, every file fsynced, then the folder is renamed to its
step name: a folder named `step-*` is always complete, so `kill -9` at any moment leaves the
previous checkpoints intact. Only the newest `keep` checkpoints are kept (deleted after the new
one is in place).
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MODEL, EMA, STATE = "model.safetensors", "ema.safetensors", "trainer.pt"
PARTIAL = ".partial"  # not a step-* name: checkpoint.latest never picks it
_NAME = re.compile(r"^step-(\d+)$")


def folder(rundir: str | Path) -> Path:
    return Path(rundir) / "checkpoints"


def step_dir(rundir: str | Path, step: int) -> Path:
    return folder(rundir) / f"step-{step:07d}"


def list_steps(rundir: str | Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first."""
    root = folder(rundir)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _NAME.match(p.name)))


def latest(rundir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    steps = list_steps(rundir)
    return step_dir(rundir, steps[-1]) if steps else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tensors(state_dict: dict) -> dict:
    """Detached, contiguous CPU copies: safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def save(rundir: str | Path, step: int, model_sd: dict, ema_sd: dict | None, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. Returns its folder."""
    root = folder(rundir)
    tmp = root / PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_tensors(model_sd), str(tmp / MODEL), metadata={"format": "pt", "step": str(step)})
    if ema_sd is not None:
        save_file(_tensors(ema_sd), str(tmp / EMA), metadata={"format": "pt", "step": str(step)})
    torch.save({**state, "step": step}, tmp / STATE)
    for f in tmp.iterdir():
        _fsync(f)
    final = step_dir(rundir, step)
    if final.exists():  # rewriting the same step (a rerun that ended where it resumed): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    for old in list_steps(rundir)[:-keep] if keep > 0 else []:
        shutil.rmtree(step_dir(rundir, old), ignore_errors=True)
    return final


def clean_partial(rundir: str | Path) -> bool:
    """Remove a half-written checkpoint a killed run left behind; True if there was one."""
    tmp = folder(rundir) / PARTIAL
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return True
    return False


def load_weights(path: str | Path) -> dict:
    return load_file(str(path))


def load_state(ckpt_dir: str | Path) -> dict:
    """trainer.pt of a checkpoint folder; tensors and plain containers only (weights_only=True)."""
    return torch.load(Path(ckpt_dir) / STATE, map_location="cpu", weights_only=True)
