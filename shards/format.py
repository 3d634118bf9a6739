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


def caption_file(capdir: str | Path, shard: str | Path) -> Path:
    """CAPDIR/NNNNN.parquet for curated shard NNNNN.tar."""
    return Path(capdir) / f"{Path(shard).name.split('.')[0]}.parquet"


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
