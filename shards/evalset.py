"""The evaluation image set: prompt files in, `<name>/<prompt_idx>-<seed>.png` + `.json` out.

The contract between whatever generates images for a study (`training/sample --prompts`, a diffusers
pipeline through `evaluation/generate`) and what reads them (`evaluation/evaluate`, the vote store):

    EVALDIR/images/<name>/<prompt_idx>-<seed>.png   one image per prompt and seed
    EVALDIR/images/<name>/<prompt_idx>-<seed>.json  its sidecar: prompt, category, run, stage, seed, steps, cfg,
                                                    size, uncond, checkpoint (written last: marks the image done)
    EVALDIR/images/<name>/generation.json           how the folder was made (run, checkpoint, stage, sampler,
                                                    steps, cfg, size, models, prompts file, seeds)

Prompt files as the field writes them: .txt (one per line), .jsonl ({"prompt", optional
"category"}), or MJHQ-30K's `meta_data.json` ({id: {"prompt": ..., "category": ...}}).
Each (prompt, seed) image is drawn from `torch.Generator().manual_seed(seed)`, so every model
of a study starts from the same noise where the latent shapes agree.

EVALDIR may be a bucket URL: `write_folder` writes each image and sidecar as its own object (the
sidecar last, as on disk), and `working_copy` gives evaluation/evaluate a local copy of the folder
whose new and changed files are uploaded when it is done (scoring reads every image anyway). The
votes' SQLite database (evaluation/store.py) stays on disk: a database cannot live in a bucket.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shards import storage
from shards.errors import SigmaError
from shards.storage import Loc

IMAGES = "images"
RECORD = "generation.json"


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """[{"prompt", "category" (or None), "id" (or None)}] from a .txt, .jsonl or MJHQ-style .json."""
    path = Path(path)
    if not path.is_file():
        raise SigmaError(f"{path}: prompt file not found")
    if path.suffix not in (".txt", ".jsonl", ".json"):
        raise SigmaError(f"{path}: prompt file must be .txt, .jsonl or .json (MJHQ-30K's meta_data.json)")
    text = path.read_text(encoding="utf-8", errors="replace")
    prompts = _read_json(path, text) if path.suffix == ".json" else _read_lines(path, text)
    if not prompts:
        raise SigmaError(f"{path}: no prompts in the file")
    return prompts


def _read_lines(path: Path, text: str) -> list[dict[str, Any]]:
    prompts = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append({"prompt": line.strip(), "category": None, "id": None})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SigmaError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SigmaError(f'{path} line {n}: expected an object with a non-empty "prompt" string')
        prompts.append({"prompt": row["prompt"].strip(), "category": _category(path, n, row), "id": None})
    return prompts


def _read_json(path: Path, text: str) -> list[dict[str, Any]]:
    """MJHQ-30K's meta_data.json: {id: {"prompt": str, "category": str}}, in file order."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SigmaError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise SigmaError(f'{path}: expected {{id: {{"prompt": ..., "category": ...}}}} (MJHQ-30K meta_data.json)')
    prompts = []
    for key, row in data.items():
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SigmaError(f'{path} id {key}: expected an object with a non-empty "prompt" string')
        prompts.append({"prompt": row["prompt"].strip(), "category": _category(path, key, row), "id": str(key)})
    return prompts


def _category(path: Path, where: str | int, row: dict[str, Any]) -> str | None:
    cat = row.get("category")
    if cat is not None and not (isinstance(cat, str) and cat.strip()):
        raise SigmaError(
            f'{path} {"line" if isinstance(where, int) else "id"} {where}: "category" must be a non-empty string'
        )
    return cat.strip() if cat else None


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]."""
    parts = [s.strip() for s in text.split(",")]
    if not all(p.lstrip("-").isdigit() for p in parts) or len(set(parts)) != len(parts):
        raise SigmaError(f"--seeds {text}: expected distinct integers separated by commas, e.g. 0,1")
    return [int(p) for p in parts]


def image_stem(folder: str | Path | Loc, prompt_idx: int, seed: int) -> Loc:
    return _loc(folder) / f"{prompt_idx}-{seed}"


def _loc(folder: str | Path | Loc) -> Loc:
    return folder if isinstance(folder, Loc) else storage.resolve(folder)


def _with(stem: Loc, suffix: str) -> Loc:
    return stem.parent / (stem.name + suffix)


def sidecar(name: str, prompt_idx: int, prompt: dict[str, Any], seed: int, settings: dict[str, Any]) -> dict[str, Any]:
    """One image's record; `settings`: stage, steps, cfg, size, uncond, checkpoint (what changes the pixels)."""
    return {
        "prompt": prompt["prompt"],
        "prompt_idx": prompt_idx,
        "category": prompt["category"],
        "run": name,
        "seed": seed,
        **settings,
    }


def done(stem: Loc, meta: dict[str, Any]) -> bool:
    """The image exists and its sidecar records exactly these settings."""
    js = _with(stem, ".json")
    if not (js.has_file() and _with(stem, ".png").has_file()):
        return False
    try:
        return bool(json.loads(js.read_text()) == meta)
    except json.JSONDecodeError:
        return False


def write_folder(
    make: Callable[[str, int], Any],
    folder: str | Path | Loc,
    prompts: list[dict[str, Any]],
    seeds: list[int],
    settings: dict[str, Any],
    record: dict[str, Any],
    log: Callable[[str], None] = print,
) -> int:
    """Every (prompt, seed) image of one model into `folder` (named for it), skipping those done;
    `make(prompt text, seed) -> PIL image`. Writes generation.json first; returns how many were made."""
    from shards.atomic import write_bytes, write_text

    folder = _loc(folder)
    name = folder.name
    write_text(
        folder / RECORD,
        json.dumps({**record, "name": name, **settings, "seeds": seeds, "prompts": len(prompts)}, indent=1) + "\n",
    )
    made = 0
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            stem, meta = image_stem(folder, i, seed), sidecar(name, i, prompt, seed, settings)
            if done(stem, meta):
                continue
            _with(stem, ".json").unlink()  # a stale sidecar must not outlive its image
            buf = io.BytesIO()
            make(prompt["prompt"], seed).save(buf, format="PNG")
            write_bytes(_with(stem, ".png"), buf.getvalue())
            write_text(_with(stem, ".json"), json.dumps(meta, indent=1) + "\n")  # last: marks it done
            made += 1
        log(f"{name}: prompt {i + 1}/{len(prompts)}")
    return made


def read_sidecars(evaldir: str | Path) -> list[dict[str, Any]]:
    """Every image's sidecar under EVALDIR/images/*/ whose PNG exists (others' JSON files skipped),
    with `text` (the raw sidecar) and `png` (its path) added."""
    metas = []
    for js in sorted(Path(evaldir).glob(f"{IMAGES}/*/*.json")):
        png = js.with_suffix(".png")
        if js.name == RECORD or not png.exists():
            continue
        try:
            text = js.read_text()
            meta = json.loads(text)
            meta["prompt_idx"], meta["seed"] = int(meta["prompt_idx"]), int(meta["seed"])
            meta["run"], meta["prompt"] = js.parent.name, str(meta["prompt"])  # the folder names the model
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # not one of ours
        metas.append({**meta, "text": text, "png": png})
    return metas


@contextlib.contextmanager
def working_copy(evaldir: Loc, keep: Callable[[str], bool] = lambda name: True) -> Iterator[Path]:
    """A local folder to read and write EVALDIR in: the folder itself on disk; for a bucket a temp copy
    of its files (those whose relative path `keep` accepts), and after the block every file there that
    is new or changed uploaded, each as one object (nothing is uploaded if the block raises)."""
    if evaldir.is_local:
        yield evaldir.local
        return
    with tempfile.TemporaryDirectory(prefix="sigmaforge-evaldir-") as tmp:
        root = Path(tmp)
        before: dict[str, tuple[int, int]] = {}
        for f in evaldir.files():
            rel = f.relative_to(evaldir)
            if keep(rel):
                dest = root / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                f.download(dest)
                st = os.stat(dest)
                before[rel] = (st.st_size, st.st_mtime_ns)
        yield root
        for local in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")):
            rel = local.relative_to(root).as_posix()
            st = local.stat()
            if before.get(rel) != (st.st_size, st.st_mtime_ns):
                (evaldir / rel).upload(local)
