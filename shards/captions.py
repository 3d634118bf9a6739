"""The one reader of caption files: a recaption CAPDIR, or a caption table made anywhere else.

`--captions` (encode, the caption report) names one of:

    CAPDIR/NNNNN.parquet       one file per curated shard (captioning/recaption's output)      -> "per_shard"
    FILE.parquet|jsonl|csv     one table with at least `key, caption`                          -> "table"
    DIR/ of such files         read as one table (any names; sub-folders are not searched)     -> "table"

A folder is per-shard when all its caption files are named NNNNN.parquet and one of them is named
after a given shard; anything else is a table, joined on the curated `key` (manifest.parquet) by
encode's tasks (encoding/caption_table.py: a slice of a table at a time, never the whole in one place).
Whatever a file lacks of `shards.format.CAPTION_COLUMNS` is filled here, once: `status` kept when
the caption is non-empty (else failed / empty_caption), `captioner` "table:<file name>", `prompt`
"", `original_caption` null (encode then reads the shard's KEY.txt), `num_tokens` 0 (not counted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shards import format as fmt
from shards import reasons, storage
from shards.errors import SigmaError

TABLE_EXTS = (".parquet", ".jsonl", ".csv")
PER_SHARD, TABLE = "per_shard", "table"


Place = str | Path | storage.Loc  # a caption file or folder, on disk or in a bucket


@dataclass
class CaptionSource:
    """What `--captions` names, resolved: its kind and the files it reads. `path` is the user's text (for
    messages), `loc` where it is."""

    path: str
    kind: str  # PER_SHARD or TABLE
    files: list[storage.Loc] = field(default_factory=list)
    loc: storage.Loc | None = None

    def shard_file(self, shard: Place) -> storage.Loc:
        """The per-shard caption file of a curated shard (PER_SHARD only)."""
        return fmt.caption_file(self.loc or storage.resolve(self.path), shard)


def _loc(p: Place) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def _files_in(folder: storage.Loc) -> list[storage.Loc]:
    """The files directly in a folder (a bucket prefix: one listing), sorted by name."""
    if folder.is_local:
        return [f for f in folder.iterdir() if f.is_file()]
    try:
        found = folder.fs.ls(folder.path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(folder / str(i["name"]).rstrip("/").rsplit("/", 1)[-1] for i in found if i.get("type") == "file")


def resolve(path: Place, shards: list[Any] | None = None, options: Any = None) -> CaptionSource:
    """Decide what `path` is (`options`: the config's storage section, for a bucket URL given as text);
    SigmaError (one line) when it holds no caption file."""
    p = path if isinstance(path, storage.Loc) else storage.resolve(path, options)
    if p.is_file():
        if p.suffix not in TABLE_EXTS:
            raise SigmaError(f"--captions {path}: not a caption table (expected {', '.join(TABLE_EXTS)})")
        return CaptionSource(str(path), TABLE, [p], p)
    if not p.is_dir():
        raise SigmaError(f"--captions {path}: no such file or folder")
    files = [f for f in _files_in(p) if f.suffix in TABLE_EXTS and not f.name.startswith(".")]  # not atomic temps
    if not files:
        raise SigmaError(f"--captions {path}: no caption files ({', '.join('*' + e for e in TABLE_EXTS)})")
    names = {f.name for f in files}
    per_shard = all(fmt.SHARD_RE.match(Path(n).stem + ".tar") and n.endswith(".parquet") for n in names)
    if per_shard and (shards is None or any(fmt.caption_file(p, s).name in names for s in shards)):
        _check_columns(files)
        return CaptionSource(str(path), PER_SHARD, files, p)
    return CaptionSource(str(path), TABLE, files, p)


@contextlib.contextmanager
def readable(loc: storage.Loc) -> Iterator[Any]:
    """What pyarrow and pandas read: the path on disk, a streamed file object from a bucket."""
    if loc.is_local:
        yield loc.path
        return
    with loc.open("rb") as f:
        yield f


def _check_columns(files: list[storage.Loc]) -> None:
    """Per-shard files are read by the shards' tasks: their columns are checked here first (footers only),
    so a file without `key` or `caption` is one line now, not every sample `missing_caption` later."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for f in files:
        try:
            with readable(f) as src:
                names = pq.read_schema(src).names
        except (OSError, pa.ArrowException) as e:
            raise SigmaError(f"{f}: unreadable caption file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        missing = [c for c in ("key", "caption") if c not in names]
        if missing:
            raise SigmaError(
                f"{f}: no {' or '.join(repr(c) for c in missing)} column (a caption file needs "
                f"'key' and 'caption'; it has {names[:8]})"
            )


def read_file(path: Place, row_groups: tuple[int, int] | None = None) -> Any:  # a pandas DataFrame
    """One caption file as a DataFrame with exactly CAPTION_COLUMNS (missing ones filled, see above);
    `row_groups` (start, stop): only those row groups of a parquet (a slice of a big table)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _loc(path)
    if path.suffix not in TABLE_EXTS:
        raise SigmaError(f"{path}: not a caption table (expected {', '.join(TABLE_EXTS)})")
    try:
        with readable(path) as src:
            if path.suffix == ".parquet" and row_groups is not None:
                df = pq.ParquetFile(src).read_row_groups(range(*row_groups)).to_pandas()
            elif path.suffix == ".parquet":
                df = pd.read_parquet(src)
            elif path.suffix == ".jsonl":
                df = pd.read_json(src, lines=True, dtype=False)
            else:
                df = pd.read_csv(src, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise SigmaError(f"{path}: unreadable caption file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return normalize(df, path.name)


def normalize(df: Any, name: str) -> Any:
    """Fill what a `key, caption` table lacks; check what it has."""
    import pandas as pd

    missing = [c for c in ("key", "caption") if c not in df.columns]
    if missing:
        raise SigmaError(
            f"{name}: no {' or '.join(repr(c) for c in missing)} column (a caption table needs "
            f"'key' and 'caption'; it has {list(df.columns)[:8]})"
        )
    out = pd.DataFrame({"key": df["key"].astype(str), "caption": df["caption"].fillna("").astype(str)})
    text = out["caption"].str.strip() != ""
    if "status" in df.columns:
        out["status"] = df["status"].fillna("").astype(str)
        bad = sorted(set(out["status"]) - set(reasons.STATUSES))
        if bad:
            raise SigmaError(f"{name}: status {bad[0]!r} is not one of {list(reasons.STATUSES)}")
    else:
        out["status"] = [reasons.KEPT if t else reasons.FAILED for t in text]
    if "reason" in df.columns:
        out["reason"] = df["reason"].fillna("").astype(str)
    else:
        out["reason"] = [
            reasons.EMPTY_CAPTION if s != reasons.KEPT and not t else "" for s, t in zip(out["status"], text)
        ]
    out["captioner"] = df["captioner"].fillna("").astype(str) if "captioner" in df.columns else f"table:{name}"
    out["prompt"] = df["prompt"].fillna("").astype(str) if "prompt" in df.columns else ""
    out["original_caption"] = (
        df["original_caption"].astype(object).where(df["original_caption"].notna(), None)
        if "original_caption" in df.columns
        else None
    )
    out["num_tokens"] = (
        pd.to_numeric(df["num_tokens"], errors="coerce").fillna(0).astype(int) if "num_tokens" in df.columns else 0
    )
    return out[fmt.CAPTION_COLUMNS]


def to_arrow(df: Any) -> Any:  # a pyarrow Table
    """Normalized rows as an Arrow table of fixed types (an empty or all-null column keeps its type)."""
    import pyarrow as pa

    types = {c: pa.int64() if c == "num_tokens" else pa.string() for c in fmt.CAPTION_COLUMNS}
    return pa.table({c: pa.array(df[c].tolist(), types[c]) for c in fmt.CAPTION_COLUMNS})


def read_table(source: CaptionSource) -> Any:
    """Every row of a source's files as one DataFrame (+ `file`: the file's stem); a key given twice is refused."""
    import pandas as pd

    frames = [read_file(f).assign(file=f.stem) for f in source.files]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*fmt.CAPTION_COLUMNS, "file"])
    check_unique(df, source.path)
    return df


def check_unique(df: Any, path: str) -> None:
    """Refuse a key with two caption rows (rows with a `file` column: where each row came from)."""
    dup = df["key"].duplicated(keep=False)
    if dup.any():
        key = df.loc[dup, "key"].iloc[0]
        where = sorted(set(df.loc[df["key"] == key, "file"]))
        raise SigmaError(
            f"--captions {path}: key {key!r} has {int((df['key'] == key).sum())} caption rows "
            f"(in {', '.join(where)}); give each key one caption"
        )


def no_curated_key(path: str, n_keys: int, example: str) -> SigmaError:
    """A table none of whose keys is a curated key (the usual cause: keyed by URL or file name)."""
    return SigmaError(
        f"--captions {path}: none of its {n_keys} keys is a key of the curated shards "
        f"(e.g. {example!r}); key captions by the curated `key` (CURDIR/manifest.parquet)"
    )
