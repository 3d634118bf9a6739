"""Write once, atomically: on disk a temp file in the same folder + rename; on a bucket a local temp file
uploaded as one object (shards/storage.py: a bucket has no rename). Every writer uses this."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards import storage
from shards.storage import Loc

Dest = str | os.PathLike[str] | Loc


@contextlib.contextmanager
def atomic_path(dest: Dest) -> Iterator[Path]:
    """Yield a local temp path; it becomes `dest` only if the block succeeds: renamed onto it on disk
    (the temp file is beside it), uploaded as one object to a bucket (the temp file is in TMPDIR)."""
    if isinstance(dest, Loc) and not dest.is_local:
        with storage.temp_file(dest.name) as tmp:
            yield tmp
            dest.upload(tmp)
        return
    with storage.local_temp(dest) as tmp:
        yield tmp


def write_bytes(path: Dest, data: bytes) -> None:
    if isinstance(path, Loc) and not path.is_local:
        path.write_object(data)  # one PUT: the object appears whole
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path: Dest, text: str) -> None:
    write_bytes(path, text.encode())


def write_parquet(path: Dest, table: Any) -> None:
    """Write a pyarrow Table (or pandas DataFrame) atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def clean_temp(folder: Dest) -> int:
    """Remove temp files a killed writer left behind on disk; returns how many (a bucket has none: an
    upload that did not complete never appears)."""
    if isinstance(folder, Loc) and not folder.is_local:
        return 0
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        n += 1
    return n
