"""The one tar member writer: fixed headers (mtime 0, mode 644, USTAR), so the same bytes in the
same order give a byte-identical tar. Curated shards (`shards/curated.py`) and training shards
(`shards/encoded.py`) are both written through it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import IO

FORMAT = tarfile.USTAR_FORMAT


def open_for_writing(path: str | Path | IO[bytes]) -> tarfile.TarFile:
    """A new tar at `path` (callers write to a temp name and rename it when complete), or into an open
    binary file (a `shards.storage.writer`; closing the tar leaves the file open)."""
    if isinstance(path, (str, Path)):
        return tarfile.open(path, "w", format=FORMAT)
    return tarfile.open(fileobj=path, mode="w", format=FORMAT)


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append member `name` holding `data`, with a header that depends on nothing but name and size."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))
