"""A stage's fingerprint: what it read and the settings that change what it writes, recorded in its
output folder on the first run and compared on every resume.

A resume whose fingerprint differs is refused with one line naming what changed: finished parts
made from other inputs or settings are never silently reused. To start over, use another `--out`
or delete the folder. Values are flat and JSON-able (strings, numbers, lists, dicts).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from shards import storage
from shards.atomic import write_text
from shards.errors import SigmaError

FILE = "fingerprint.json"
OUTPUT = "output"  # config field metadata: False on a setting that does not change what a stage writes
_CHUNK = 1 << 20


def _loc(p: str | Path | storage.Loc) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def file_digest(path: str | Path | storage.Loc) -> str:
    """sha256 of a file's bytes (a URL list, a config file), on disk or in a bucket: streamed, ~1 GB/s local."""
    h = hashlib.sha256()
    with _loc(path).open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def listing(paths: Iterable[str | Path | storage.Loc]) -> str:
    """sha256 over (name, size) of many input files, on disk or in a bucket (shards: too big to hash, cheap
    to list)."""
    h = hashlib.sha256()
    for p in sorted(map(_loc, paths)):
        h.update(f"{p.name}\t{p.size() if p.exists() else -1}\n".encode())
    return h.hexdigest()


def changes_output(f: dataclasses.Field[Any]) -> bool:
    """Whether a config field changes what its stage writes: every setting does unless its metadata says
    `{OUTPUT: False}` (how many processes, threads or GPUs; where to write; how far to train)."""
    return bool(f.metadata.get(OUTPUT, True))


def flat(settings: Any, prefix: str) -> dict[str, Any]:
    """The settings that change a stage's output, from a config section (dataclass or dict), as
    {"prefix.a.b": value}, so a refusal names the very key; nested sections are walked."""
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        items = [(f.name, getattr(settings, f.name)) for f in dataclasses.fields(settings) if changes_output(f)]
    else:
        items = list(settings.items())
    out: dict[str, Any] = {}
    for k, v in items:
        key = f"{prefix}.{k}"
        if (dataclasses.is_dataclass(v) and not isinstance(v, type)) or (isinstance(v, dict) and v):
            out.update(flat(v, key))
        else:
            out[key] = v
    return out


def check(folder: str | Path | storage.Loc, fingerprint: dict[str, Any]) -> None:
    """Record `fingerprint` in FOLDER/fingerprint.json, or refuse a resume whose fingerprint differs."""
    path = _loc(folder) / FILE
    current = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
    if not path.exists():
        write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SigmaError(
            f"{path}: unreadable ({type(e).__name__}); delete it only if {folder} is yours to redo"
        ) from None
    changed = sorted(k for k in old.keys() | current.keys() if old.get(k) != current.get(k))
    if changed:
        raise SigmaError(
            f"{folder}: made with another {', '.join(changed)} (see {FILE}); "
            f"use another --out, or delete the folder to start over"
        )
