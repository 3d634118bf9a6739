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
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shards.errors import SigmaError

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


class Unreadable(SigmaError):
    """A weights or state file that cannot be read (truncated, empty, another format): resume falls
    back to the previous checkpoint."""


def load_weights(path: str | Path) -> dict:
    """A safetensors state dict; Unreadable names the file and why (never a pickle: safetensors only)."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise Unreadable(
            f"{path}: not a readable .safetensors file ({e}; truncated, empty or another "
            f"format such as a pickled .pth?)"
        ) from None


def load_state(ckpt_dir: str | Path) -> dict:
    """trainer.pt of a checkpoint folder; tensors and plain containers only (weights_only=True)."""
    path = Path(ckpt_dir) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise Unreadable(f"{path}: unreadable trainer state ({type(e).__name__})") from None


def load_resumable(rundir: str | Path, ema: bool) -> tuple[Path, dict, dict | None, dict, list[str]] | None:
    """The newest checkpoint that reads completely: (folder, model weights, EMA weights or None,
    trainer state, [one line per newer checkpoint skipped and why]); None without any."""
    skipped = []
    for step in reversed(list_steps(rundir)):
        ckpt = step_dir(rundir, step)
        try:
            weights, state = load_weights(ckpt / MODEL), load_state(ckpt)
            ema_sd = load_weights(ckpt / EMA) if ema and (ckpt / EMA).exists() else None
        except Unreadable as e:
            skipped.append(f"checkpoint step {step} is unreadable ({e}); falling back to the previous one")
            continue
        return ckpt, weights, ema_sd, state, skipped
    if skipped:
        raise SigmaError(f"{folder(rundir)}: no readable checkpoint ({skipped[-1]})")
    return None


def rng_state() -> dict:
    """This process's Python, NumPy, torch (and CUDA) RNG states: one entry of trainer.pt's `rng`."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
