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
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shards.errors import SigmaError

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


def image_stem(folder: str | Path, prompt_idx: int, seed: int) -> Path:
    return Path(folder) / f"{prompt_idx}-{seed}"


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


def done(stem: Path, meta: dict[str, Any]) -> bool:
    """The image exists and its sidecar records exactly these settings."""
    js = stem.with_suffix(".json")
    if not (js.exists() and stem.with_suffix(".png").exists()):
        return False
    try:
        return bool(json.loads(js.read_text()) == meta)
    except json.JSONDecodeError:
        return False


def write_folder(
    make: Callable[[str, int], Any],
    folder: str | Path,
    prompts: list[dict[str, Any]],
    seeds: list[int],
    settings: dict[str, Any],
    record: dict[str, Any],
    log: Callable[[str], None] = print,
) -> int:
    """Every (prompt, seed) image of one model into `folder` (named for it), skipping those done;
    `make(prompt text, seed) -> PIL image`. Writes generation.json first; returns how many were made."""
    from shards.atomic import write_bytes, write_text

    folder = Path(folder)
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
            stem.with_suffix(".json").unlink(missing_ok=True)  # a stale sidecar must not outlive its image
            buf = io.BytesIO()
            make(prompt["prompt"], seed).save(buf, format="PNG")
            write_bytes(stem.with_suffix(".png"), buf.getvalue())
            write_text(stem.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")  # last: marks it done
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
