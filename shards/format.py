"""On-disk formats between stages: names, columns and members. Import these; never retype them.

curation  ->  CURDIR/shards/NNNNN.tar     WebDataset: KEY.<jpg|png|webp> (original bytes), KEY.json, KEY.txt
              CURDIR/manifest.parquet     one row per input URL (MANIFEST_COLUMNS + carried input columns)
captioning -> CAPDIR/NNNNN.parquet        one per curated shard, one row per sample (CAPTION_COLUMNS;
                                          or a `key, caption` table from elsewhere: shards/captions.py)
encode    ->  ENCDIR/...                  see shards/encoded.py
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, overload

from shards import storage
from shards.errors import SigmaError

IMAGE_EXTS = ("jpg", "png", "webp")  # members of a curated shard holding the served bytes
META_EXT, CAPTION_EXT = "json", "txt"

SHARD_NAME = "{:05d}.tar"
SHARD_RE = re.compile(r"^(\d{5})\.tar$")

MANIFEST = "manifest.parquet"
MANIFEST_COLUMNS = [
    "url",
    "key",
    "status",
    "reason",
    "width",
    "height",
    "tier",
    "aesthetic",
    "sharpness",
    "contrast",
    "brightness",
    "nsfw",
    "watermark",
    "sha256",
    "phash",
    "dup_of",
    "shard",
]

CAPTION_COLUMNS = [
    "key",
    "caption",
    "captioner",
    "prompt",
    "original_caption",
    "num_tokens",
    "status",
    "reason",
]


def shard_name(index: int) -> str:
    return SHARD_NAME.format(index)


def shard_index(path: str | Path) -> int:
    m = SHARD_RE.match(Path(path).name)
    if not m:
        raise SigmaError(f"{path}: not a shard name (expected NNNNN.tar)")
    return int(m.group(1))


@overload
def caption_file(capdir: storage.Loc, shard: str | Path | storage.Loc) -> storage.Loc: ...


@overload
def caption_file(capdir: str | Path, shard: str | Path | storage.Loc) -> Path: ...


def caption_file(capdir: str | Path | storage.Loc, shard: str | Path | storage.Loc) -> Path | storage.Loc:
    """CAPDIR/NNNNN.parquet for curated shard NNNNN.tar (a Loc in a Loc, a Path in a local path)."""
    name = shard.name if isinstance(shard, storage.Loc) else Path(shard).name
    stem = f"{name.split('.')[0]}.parquet"
    return capdir / stem if isinstance(capdir, storage.Loc) else Path(capdir) / stem


def expand_shards(spec: str) -> list[Path]:
    """Shard list from a brace pattern ('d/{00000..00041}.tar'), a glob, or a directory."""
    import glob

    import braceexpand  # ships with webdataset

    p = Path(spec)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    out: list[Path] = []
    for s in braceexpand.braceexpand(spec):
        matches = sorted(glob.glob(s)) if any(c in s for c in "*?[") else [s]
        out.extend(Path(m) for m in matches)
    return out


def shard_locs(spec: str, options: Any = None) -> list[storage.Loc]:
    """`expand_shards` on disk or in a bucket (a user's `--shards`/`--images`, resolved once): a folder's
    *.tar, or a brace pattern / glob (`storage.expand`; a name without a glob is kept even if missing)."""
    if not storage.has_pattern(spec):
        loc = storage.resolve(spec, options)
        if loc.is_dir():
            return loc.glob("*.tar")
        return [loc]
    return storage.expand(spec, options)
