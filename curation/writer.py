"""Curated WebDataset shards: KEY.<ext> (the served bytes, untouched), KEY.json, KEY.txt.

Members are written sorted by key (Ray's WebDataset reader mis-groups out-of-order members),
with fixed tar headers, so the same inputs give byte-identical shards. The image bytes are read
straight from the download shard at their recorded offset: they never pass through the driver.
A shard appears under its final name only when complete (temp + rename); an existing shard is
finished work and is never rewritten.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from curation.download import read_member
from shards import atomic
from shards.format import CAPTION_EXT, META_EXT


def _meta(meta: dict | str) -> bytes:
    return (meta if isinstance(meta, str) else meta_json(meta)).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def meta_json(meta: dict) -> str:
    """A sample's KEY.json text (sorted keys: the same row gives the same bytes)."""
    return json.dumps(meta, sort_keys=True, default=str)


def write_shard(path: str | Path, members: list[dict]) -> str:
    """members: {key, src, offset, size, ext, meta (dict or its meta_json), caption (str|None)}; returns the path."""
    path = Path(path)
    if path.exists():
        return str(path)
    with atomic.atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for m in sorted(members, key=lambda m: m["key"]):
            files = {m["ext"]: read_member(m["src"], m["offset"], m["size"]), META_EXT: _meta(m["meta"])}
            if m.get("caption"):
                files[CAPTION_EXT] = str(m["caption"]).encode()
            for ext in sorted(files):
                _add(tar, f"{m['key']}.{ext}", files[ext])
    return str(path)
