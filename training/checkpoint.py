"""Run checkpoints: weights as safetensors, trainer state through torch.save/load(weights_only=True).

    RUNDIR/checkpoints/step-0000500/model.safetensors   the trained weights (what the next stage starts from)
                                    ema.safetensors     the EMA copy (what sampling and export prefer)
                                    trainer.pt          step, optimizer, RNG states per rank, data position
                                    _COMMITTED          (on a store) the marker, written last
    RUNDIR/checkpoints/.partial/                        (on disk) a checkpoint being written

On disk a checkpoint is written into `.partial/`, every file fsynced, then the folder is renamed to
its step name: a folder named `step-*` is always complete, so `kill -9` at any moment leaves the
previous checkpoints intact (runs made before stores were supported resume as they are). On an
object store (RUNDIR is an `s3://...` Loc; a bucket has no rename) the files are written to a local
temp folder, uploaded into `step-*/`, and the checkpoint is committed by the marker object
`_COMMITTED` written last (shards/storage.py `staging`); a `step-*/` prefix without its marker (a
killed upload) is never chosen and is removed at the next start. Only the newest `keep` checkpoints
are kept, deleted after the new one is committed (on a store the marker first, so a half-deleted
checkpoint is never taken for a complete one).

Every function takes the run folder as a local path or a `shards.storage.Loc` and gives back the same
kind: a Path for a path, a Loc for a Loc.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shards import storage
from shards.errors import SigmaError
from shards.storage import Loc

MODEL, EMA, STATE = "model.safetensors", "ema.safetensors", "trainer.pt"
PARTIAL = ".partial"  # not a step-* name: checkpoint.latest never picks it
_NAME = re.compile(r"^step-(\d+)$")


def _place(rundir: str | os.PathLike[str] | Loc) -> Path | Loc:
    return rundir if isinstance(rundir, Loc) else Path(rundir)


def _on_store(p: Path | Loc) -> bool:
    return isinstance(p, Loc) and not p.is_local


def folder(rundir: str | os.PathLike[str] | Loc) -> Path | Loc:
    return _place(rundir) / "checkpoints"


def step_dir(rundir: str | os.PathLike[str] | Loc, step: int) -> Path | Loc:
    return folder(rundir) / f"step-{step:07d}"


def list_steps(rundir: str | os.PathLike[str] | Loc) -> list[int]:
    """Steps of the complete checkpoints, oldest first: on disk the `step-*` folders, on a store the
    `step-*/` prefixes holding their marker (one HEAD each: a listing is not trusted for commits)."""
    root = folder(rundir)
    if isinstance(root, Path) and not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name))]
    if _on_store(root):
        return sorted(s for s, p in found if (p / storage.MARKER).has_file())
    return sorted(s for s, p in found if p.is_dir())


def latest(rundir: str | os.PathLike[str] | Loc) -> Path | Loc | None:
    """The newest complete checkpoint folder, or None."""
    steps = list_steps(rundir)
    return step_dir(rundir, steps[-1]) if steps else None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _tensors(state_dict: dict) -> dict:
    """Detached, contiguous CPU copies: safetensors refuses shared or strided storage."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}


def _write_files(tmp: Path, step: int, model_sd: dict, ema_sd: dict | None, state: dict) -> None:
    save_file(_tensors(model_sd), str(tmp / MODEL), metadata={"format": "pt", "step": str(step)})
    if ema_sd is not None:
        save_file(_tensors(ema_sd), str(tmp / EMA), metadata={"format": "pt", "step": str(step)})
    torch.save({**state, "step": step}, tmp / STATE)


def save(
    rundir: str | os.PathLike[str] | Loc, step: int, model_sd: dict, ema_sd: dict | None, state: dict, keep: int
) -> Path | Loc:
    """Write checkpoint `step` atomically, then delete all but the newest `keep`. Returns its folder."""
    final = step_dir(rundir, step)
    if _on_store(final):
        assert isinstance(final, Loc)
        with tempfile.TemporaryDirectory(prefix="sigmaforge-ckpt-") as tmp:
            _write_files(Path(tmp), step, model_sd, ema_sd, state)
            with storage.staging(final) as dest:  # a leftover of this step removed; the marker written last
                for f in sorted(Path(tmp).iterdir()):
                    (dest / f.name).upload(f)
    else:
        _save_local(Path(os.fspath(final)), step, model_sd, ema_sd, state)
    for old in list_steps(rundir)[:-keep] if keep > 0 else []:
        remove(step_dir(rundir, old))
    return final


def _save_local(final: Path, step: int, model_sd: dict, ema_sd: dict | None, state: dict) -> None:
    root = final.parent
    tmp = root / PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_files(tmp, step, model_sd, ema_sd, state)
    for f in tmp.iterdir():
        _fsync(f)
    if final.exists():  # rewriting the same step (a rerun that ended where it resumed): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)


def remove(ckpt: Path | Loc) -> None:
    """Delete a checkpoint folder; on a store its marker first, so what a kill leaves is never chosen."""
    if _on_store(ckpt):
        assert isinstance(ckpt, Loc)
        (ckpt / storage.MARKER).unlink()
        ckpt.rmtree()
    else:
        shutil.rmtree(os.fspath(ckpt), ignore_errors=True)


def clean_partial(rundir: str | os.PathLike[str] | Loc) -> bool:
    """Remove a half-written checkpoint a killed run left behind (on disk `.partial/`, on a store the
    `step-*/` prefixes without a marker); True if there was one."""
    root = folder(rundir)
    if _on_store(root):
        done = set(list_steps(rundir))
        stale = [p for p in root.iterdir() if (m := _NAME.match(p.name)) and int(m.group(1)) not in done]
        for p in stale:
            remove(p)
        return bool(stale)
    tmp = root / PARTIAL
    if tmp.exists():
        shutil.rmtree(os.fspath(tmp), ignore_errors=True)
        return True
    return False


class Unreadable(SigmaError):
    """A weights or state file that cannot be read (truncated, empty, another format): resume falls
    back to the previous checkpoint."""


@contextlib.contextmanager
def local_copy(path: str | os.PathLike[str] | Loc) -> Iterator[Path]:
    """A local path to read `path` from: itself on disk; an object on a store downloaded into a temp
    folder (removed after the block). Unreadable if the object is missing."""
    if not _on_store(_place(path)):
        yield Path(os.fspath(path))
        return
    assert isinstance(path, Loc)
    with tempfile.TemporaryDirectory(prefix="sigmaforge-read-") as tmp:
        dest = Path(tmp) / path.name
        try:
            path.download(dest)
        except FileNotFoundError:
            raise Unreadable(f"{path}: not found") from None
        yield dest


def load_weights(path: str | os.PathLike[str] | Loc) -> dict:
    """A safetensors state dict; Unreadable names the file and why (never a pickle: safetensors only)."""
    try:
        with local_copy(path) as local:
            return load_file(str(local))
    except (SafetensorError, OSError) as e:
        raise Unreadable(
            f"{path}: not a readable .safetensors file ({e}; truncated, empty or another "
            f"format such as a pickled .pth?)"
        ) from None


def load_state(ckpt_dir: str | os.PathLike[str] | Loc) -> dict:
    """trainer.pt of a checkpoint folder; tensors and plain containers only (weights_only=True)."""
    path = _place(ckpt_dir) / STATE
    try:
        with local_copy(path) as local:
            return torch.load(local, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise Unreadable(f"{path}: unreadable trainer state ({type(e).__name__})") from None


def load_resumable(
    rundir: str | os.PathLike[str] | Loc, ema: bool
) -> tuple[Path | Loc, dict, dict | None, dict, list[str]] | None:
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
