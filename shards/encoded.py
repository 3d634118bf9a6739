"""The training-shard format (ENCDIR), version 2: member names, dtypes, fingerprint, writer, reader.

    ENCDIR/info.json                       dataset facts: FORMAT_VERSION, fingerprint, tier, bucket table,
                                           T5 path/id/revision/dim/max length, VAE path/id/revision,
                                           scaling factor, latent channels, null caption file,
                                           caption_sets {NAME: {"from", "stored"}}
    ENCDIR/index.parquet                   one row per input sample (INDEX_COLUMNS + per set
                                           t5_len_<NAME>, clip_<NAME>), encoded or not
    ENCDIR/shards/<H>x<W>/<fp8>-NNNNN.tar  training shards: samples of one bucket only, ~shard_bytes each
    ENCDIR/shards/<H>x<W>/<fp8>-NNNNN.parquet   the tar's rows: its commit marker (written after the tar)
    ENCDIR/shards/<H>x<W>/<fp8>-NNNNN.set-<NAME>.parquet   caption set NAME of that tar (below)

Members of one sample (WebDataset: the key is the name up to the first dot):

    KEY.json              {"key", "bucket", "bucket_hw": [h, w], "size": [h, w] (decoded original),
                           "resized": [h, w], "crop_box": [left, top, right, bottom] (in the resized image),
                           "source": input shard name, "fingerprint", "format_version"}
    KEY.vae.safetensors   "mean", "std": [4, H/8, W/8] fp16, the VAE latent distribution at the bucket
                          size; metadata "scaling_factor"

Caption sets. A set is one caption per sample with its T5 features, NAME matching `[a-z0-9_]+`
(`recaption`, `original` = the alt text, `short`, `qwen`, ...). Each set of a tar is one side file
beside it, `<fp8>-NNNNN.set-<NAME>.parquet`: one row per row of the tar's row file, in the tar's
order (SET_COLUMNS: key, caption, t5 = the valid tokens' fp16 features as raw bytes [t5_len,
t5_dim] row-major, t5_len, clip_score; t5 null where the sample has no caption in that set). It is
written whole (temp + rename on disk, one upload to a bucket): its presence, looked up by exact
name, is its commit. A set is added to a finished folder by writing these files and nothing else:
latents and other sets are never rewritten. A tar without a set's file lacks that set.

Version 1 folders (made before caption sets) keep two sets inside the tar: KEY.t5.safetensors
("recaption": [n, C] fp16, "original": [m, C], only the valid tokens; "original" absent when the
sample has none) and the texts in KEY.json's "captions"; they read as the inline sets `recaption`
and `original` (INLINE_SETS), their row files carry t5_len_recaption / t5_len_original, and sets
added to them later are side files like any other. The latents' bytes did not change from version
1 to 2, so the fingerprint (which names the latents' recipe) is the same and such a folder resumes.

Tensors are safetensors or raw fp16 (no pickle; ~40x faster to read than `.npz` at scale).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from shards import atomic, storage, tar_writer
from shards.errors import DISK_FULL, SigmaError, disk_full

Place = str | os.PathLike[str] | storage.Loc  # an ENCDIR or a file in it: on disk or in a bucket

FORMAT_VERSION = 2  # 2: caption sets in side files; 1: two captions inside the tar (still read)
READ_VERSIONS = (1, 2)
LATENT_FORMAT = 1  # in the fingerprint: the latent tar's recipe, unchanged by caption sets
PREPROCESS = (
    "resize-cover(bicubic;lanczos>=2048)+center-crop+[-1,1]"  # bump when encoders/vae.py's preprocessing changes
)

INFO, INDEX, SHARDS = "info.json", "index.parquet", "shards"
JSON, T5, VAE = "json", "t5.safetensors", "vae.safetensors"  # member suffixes
INDEX_COLUMNS = [
    "key",
    "status",
    "reason",
    "shard",
    "bucket",
    "bucket_h",
    "bucket_w",
    "width",
    "height",
    "source",
    "fingerprint",
]

# Caption sets (see the module docstring)
RECAPTION, ORIGINAL = "recaption", "original"  # the set a bare --captions fills; the curated alt text
INLINE_SETS = (RECAPTION, ORIGINAL)  # inside the tars of a version 1 folder
SET_NAME = re.compile(r"[a-z0-9_]+")
SET_COLUMNS = ["key", "caption", "t5", "t5_len", "clip_score"]
SET_FILE = re.compile(r"^(?P<tar>.+)\.set-(?P<name>[a-z0-9_]+)\.parquet$")
SET_ROW_GROUP = 32  # rows per row group of a side file: ~25 MB of 100-token XXL features, one read each


# ---------------------------------------------------------------------------------------------
# Fingerprint and dataset facts
# ---------------------------------------------------------------------------------------------


def fingerprint(
    t5_id: str, t5_dtype: str, max_length: int, vae_id: str, vae_dtype: str, vae_tiling: bool, table: str
) -> str:
    """What decides a sample's bytes: encoder and VAE ids and dtypes, token budget, bucket table,
    preprocessing and format version. A changed fingerprint means the sample is re-encoded."""
    facts = dict(
        format=LATENT_FORMAT,
        preprocess=PREPROCESS,
        t5=t5_id,
        t5_dtype=t5_dtype,
        max_length=max_length,
        vae=vae_id,
        vae_dtype=vae_dtype,
        vae_tiling=vae_tiling,
        table=table,
    )
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def model_id(path: str) -> str:
    """A short, stable name of a model for the fingerprint: the hub id as given, or for a local
    folder a hash of its config and of 1 MiB samples (start, middle, end) of each weights file:
    other weights of the same architecture (e.g. SDXL VAE vs its fp16-fix) get another id, without
    reading a 10 GB T5 in full."""
    p = Path(path)
    if not p.exists():
        return str(path)
    h = hashlib.sha256()
    for f in sorted(p.glob("*.json")) + sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for offset in sorted({0, max(0, size // 2 - 2**19), max(0, size - 2**20)}):
                fh.seek(offset)
                h.update(fh.read(2**20))
    return f"{p.name}:{h.hexdigest()[:16]}"


def model_revision(path: str) -> str | None:
    """The hub commit a hub id resolves to in the local Hugging Face cache (what a load would read),
    None for a local folder or an id not in the cache. Reads the cache only: no network."""
    if Path(path).exists():
        return None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(str(path), "config.json")
    except ValueError:  # not a repo id
        return None
    parts = Path(found).parts if isinstance(found, str) else ()
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def model_facts(name: str, path: str) -> dict[str, Any]:
    """What info.json records of a model the data was encoded with: `<name>` (path or hub id as
    configured), `<name>_id` (`model_id`) and `<name>_revision` (`model_revision`)."""
    return {name: path, f"{name}_id": model_id(path), f"{name}_revision": model_revision(path)}


def read_info(encdir: Place) -> dict[str, Any]:
    """ENCDIR/info.json: `scaling_factor`, `latent_channels`, `t5_dim`, `max_length`, `tier`, ...

    Training reads it to refuse latents from a VAE other than the one it decodes with.
    """
    path = _loc(encdir) / INFO
    if not path.has_file():
        raise SigmaError(f"{path}: not an encoded dataset (run encoding/encode first)")
    info: dict[str, Any] = json.loads(path.read_text())
    if info.get("format_version") not in READ_VERSIONS:
        raise SigmaError(f"{path}: format_version {info.get('format_version')}, this code reads {READ_VERSIONS}")
    return info


def write_info(encdir: Place, info: dict[str, Any]) -> None:
    atomic.write_text(_loc(encdir) / INFO, json.dumps({"format_version": FORMAT_VERSION, **info}, indent=2) + "\n")


def bucket_dir(bucket_hw: tuple[int, int]) -> str:
    return f"{SHARDS}/{bucket_hw[0]}x{bucket_hw[1]}"


# ---------------------------------------------------------------------------------------------
# Caption sets: names, side files, what a folder holds
# ---------------------------------------------------------------------------------------------


def _loc(p: Place) -> storage.Loc:
    return p if isinstance(p, storage.Loc) else storage.resolve(p)


def place(p: Place) -> storage.Loc:
    """An ENCDIR (or a file in it) as a Loc: a Loc as it is (resolved at the entry point with the
    storage options), a local path resolved."""
    return _loc(p)


def check_set_name(name: str, where: str) -> str:
    if not SET_NAME.fullmatch(name):
        raise SigmaError(f"{where}: caption set name {name!r}: use lower-case letters, digits and _ ([a-z0-9_]+)")
    return name


def len_column(name: str) -> str:
    """index.parquet's column of a set's valid-token counts (0: the sample has no caption in it)."""
    return f"t5_len_{name}"


def clip_column(name: str) -> str:
    """index.parquet's column of a set's CLIP-Scores (NaN: not scored or no caption)."""
    return f"clip_{name}"


def set_file(tar: str | os.PathLike[str] | storage.Loc, name: str) -> storage.Loc:
    """The side file of caption set `name` of a training tar: <fp8>-NNNNN.set-<name>.parquet beside it."""
    t = _loc(tar)
    return t.parent / f"{t.stem}.set-{name}.parquet"


def caption_sets(info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{set name: facts} of an ENCDIR's info.json; a version 1 folder holds the inline recaption and original."""
    sets = info.get("caption_sets")
    if sets is None:
        return {n: {"stored": "inline"} for n in INLINE_SETS}
    return dict(sets)


def _set_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("key", pa.string()),
            ("caption", pa.string()),
            ("t5", pa.binary()),
            ("t5_len", pa.int32()),
            ("clip_score", pa.float32()),
        ]
    )


class SetWriter:
    """One caption set's side file of one tar, written row by row (a row group per SET_ROW_GROUP rows,
    so a 1 GB shard's captions never sit in memory) and committed whole by `close()`."""

    def __init__(self, dest: storage.Loc):
        import pyarrow.parquet as pq

        self.dest = dest
        self._commit = atomic.atomic_path(dest)
        tmp = self._commit.__enter__()
        # fp16 features barely compress: stored plain, read at memory speed
        self._pq = pq.ParquetWriter(
            tmp,
            _set_schema(),
            compression={"key": "zstd", "caption": "zstd", "t5": "none", "t5_len": "zstd", "clip_score": "zstd"},
            use_dictionary=["key"],
        )
        self.rows: list[dict[str, Any]] = []

    def add(self, key: str, caption: str | None, feats: torch.Tensor | None, clip: float | None = None) -> None:
        """A sample's caption and its valid-token features [n, C] (None: not in this set)."""
        t5 = None if feats is None else feats.to(torch.float16).contiguous().numpy().tobytes()
        n = 0 if feats is None else int(feats.shape[0])
        self.rows.append(dict(key=key, caption=caption, t5=t5, t5_len=n, clip_score=clip))
        if len(self.rows) >= SET_ROW_GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            self._pq.write_table(pa.Table.from_pylist(self.rows, schema=_set_schema()))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self._pq.close()
        self._commit.__exit__(None, None, None)

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._pq.close()
        stop = RuntimeError("aborted")
        self._commit.__exit__(RuntimeError, stop, None)  # removes the temp file; nothing appears


def write_set(
    tar: str | os.PathLike[str] | storage.Loc,
    name: str,
    rows: list[tuple[str, str | None, torch.Tensor | None, float | None]],
) -> None:
    """A whole side file at once: rows (key, caption, features [n, C] or None, CLIP-Score or None), tar order."""
    w = SetWriter(set_file(tar, name))
    try:
        for row in rows:
            w.add(*row)
    except BaseException:
        w.abort()
        raise
    w.close()


def read_set(file: storage.Loc | IO[bytes], columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """A side file's rows in order, one row group in memory at a time (`file`: its place, or a local copy
    opened for reading, which is closed at the end). A row's `t5` is a zero-copy view of the row group's
    bytes (`pyarrow.Buffer`; `bytes(...)` copies it), so the sets a training sample does not draw are never
    copied: `set_features` copies the one it does."""
    import pyarrow.parquet as pq

    with file.open("rb") if isinstance(file, storage.Loc) else file as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=SET_ROW_GROUP, columns=columns):
            if "t5" not in batch.schema.names:
                yield from batch.to_pylist()
                continue
            t5 = batch.column("t5")
            for i, row in enumerate(batch.drop_columns(["t5"]).to_pylist()):
                row["t5"] = t5[i].as_buffer() if t5[i].is_valid else None
                yield row


def set_features(row: dict[str, Any], dim: int) -> torch.Tensor | None:
    """A side-file row's features [t5_len, dim] fp16 (a copy: the batch owns it), None when absent."""
    if row["t5"] is None:
        return None
    return torch.frombuffer(bytearray(row["t5"]), dtype=torch.float16).view(row["t5_len"], dim)


# ---------------------------------------------------------------------------------------------
# Members: tensors <-> bytes
# ---------------------------------------------------------------------------------------------


def pack_t5(features: dict[str, torch.Tensor]) -> bytes:
    """{"recaption": [n, C], "original": [m, C]} -> safetensors bytes, fp16."""
    return st_save({k: v.to(torch.float16, copy=True).contiguous() for k, v in features.items()})


def pack_vae(mean: torch.Tensor, std: torch.Tensor, scaling_factor: float) -> bytes:
    """Latent distribution [C, h, w] each -> safetensors bytes, fp16."""
    tensors = {
        "mean": mean.to(torch.float16, copy=True).contiguous(),
        "std": std.to(torch.float16, copy=True).contiguous(),
    }
    return st_save(tensors, metadata={"scaling_factor": repr(float(scaling_factor))})


def unpack(data: bytes) -> dict[str, torch.Tensor]:
    return st_load(data)


def all_finite(data: bytes) -> bool:
    """Whether every stored (fp16) tensor is finite: fp16 overflow shows up here as Inf."""
    return all(bool(torch.isfinite(t).all()) for t in st_load(data).values())


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw WebDataset sample (bytes by suffix) -> {"__key__", "meta", "t5": {...}, "vae": {...}}; "t5" holds
    a version 1 tar's inline sets ({} in version 2: the sets are side files, read by shards/loader.py).

    This is the `.safetensors` handler webdataset lacks; use it as a `.map(...)` stage.
    """
    return {
        "__key__": sample["__key__"],
        "__url__": sample.get("__url__"),
        "meta": json.loads(sample[JSON]),
        "t5": st_load(sample[T5]) if T5 in sample else {},
        "vae": st_load(sample[VAE]),
    }


# ---------------------------------------------------------------------------------------------
# Writer: one bucket's shards, rolled by size, committed atomically
# ---------------------------------------------------------------------------------------------


class BucketWriter:
    """Writes one bucket's samples into `<fp8>-NNNNN.tar` files of about `shard_bytes` each.

    A tar is streamed through `storage.writer` (on disk a temp file renamed when full or on `close`; on a
    bucket a multipart upload completed then: the driver holds one part, never a whole tar); its `.parquet`
    of rows is written after it and marks it complete. A tar without its parquet is an interrupted write.
    """

    def __init__(
        self, encdir: Place, bucket_hw: tuple[int, int], fp: str, shard_bytes: int, sets: tuple[str, ...] = ()
    ):
        self.encdir = _loc(encdir)
        self.folder = self.encdir / bucket_dir(bucket_hw)
        self.fp, self.shard_bytes, self.sets = fp, shard_bytes, sets
        self.tar: tarfile.TarFile | None = None  # the open tar, appearing at `path` when committed
        self._out: contextlib.ExitStack | None = None  # the open storage.writer under `tar`
        self.side: dict[str, SetWriter] = {}  # the open tar's caption-set files
        self.path = self.folder
        self.rows: list[dict[str, Any]] = []
        self.size = 0
        self.written: list[dict[str, Any]] = []  # rows of committed tars

    def _open(self) -> tarfile.TarFile:
        self.folder.mkdir()
        n = 0
        while (self.folder / f"{self.fp[:8]}-{n:05d}.tar").has_file():  # exact names: one HEAD each on a bucket
            n += 1
        self.path = self.folder / f"{self.fp[:8]}-{n:05d}.tar"
        self._out = contextlib.ExitStack()
        f = self._out.enter_context(storage.writer(self.path))
        self.tar = tar_writer.open_for_writing(f)
        self.side = {name: SetWriter(set_file(self.path, name)) for name in self.sets}
        return self.tar

    def write(
        self,
        meta: dict[str, Any],
        t5: bytes | None,
        vae: bytes,
        row: dict[str, Any],
        sets: dict[str, tuple[str, torch.Tensor, float | None]] | None = None,
    ) -> None:
        """One sample: its tar members (`t5` only for a version 1 layout, else None) and, per caption set
        of this writer, (caption, features [n, C], CLIP-Score or None) from `sets` (absent: not in it)."""
        tar = self.tar if self.tar is not None else self._open()
        key, sets = meta["key"], sets or {}
        members = [
            (JSON, json.dumps(meta, sort_keys=True).encode()),
            *([(T5, t5)] if t5 is not None else []),
            (VAE, vae),
        ]
        try:
            for suffix, data in members:
                tar_writer.add(tar, f"{key}.{suffix}", data)
                self.size += len(data) + 1024  # header + padding, roughly
            for name, w in self.side.items():
                text, feats, clip = sets.get(name, (None, None, None))
                w.add(key, text, feats, clip)
                self.size += 0 if feats is None else feats.numel() * 2
        except OSError as e:
            if e.errno in DISK_FULL:
                raise SigmaError(disk_full(self.path)) from None
            raise
        self.rows.append({**row, "shard": self.path.relative_to(self.encdir)})
        if self.size >= self.shard_bytes:
            self._commit()

    def _commit(self) -> None:
        import pyarrow as pa

        if self.tar is None or self._out is None:
            return
        self.tar.close()  # the end-of-archive blocks, into the writer
        for w in self.side.values():  # the sets first: the row file, written last, commits the whole shard
            w.close()
        self._out.close()  # the tar appears whole: renamed into place, or its upload completed
        atomic.write_parquet(rows_file(self.path), pa.Table.from_pylist(self.rows))
        self.written.extend(self.rows)
        self.tar, self._out, self.side, self.rows, self.size = None, None, {}, [], 0

    def abort(self) -> None:
        """Drop the open tar (a failed run, e.g. a full disk): no temp file is left, no upload completed."""
        if self.tar is not None and self._out is not None:
            for w in self.side.values():
                w.abort()
            with contextlib.suppress(Exception):
                self._out.__exit__(_Aborted, _Aborted(), None)
            self.tar, self._out, self.side, self.rows, self.size = None, None, {}, [], 0

    def close(self) -> list[dict[str, Any]]:
        """Commit the open tar; the rows of every tar this writer committed."""
        if self.tar is not None:
            self._commit()
        return self.written


class _Aborted(Exception):
    """Thrown into an open storage.writer so that it discards what it holds."""


# ---------------------------------------------------------------------------------------------
# Reading the layout
# ---------------------------------------------------------------------------------------------


def rows_file(tar: storage.Loc) -> storage.Loc:
    """A training tar's row file (its commit marker): the same name with `.parquet`."""
    return tar.parent / f"{tar.stem}.parquet"


def committed_shards(encdir: Place) -> list[storage.Loc]:
    """Every training tar whose row file exists (found by its exact name, never by a listing), sorted."""
    root = _loc(encdir) / SHARDS
    return [tar for tar in root.glob("*/*.tar") if rows_file(tar).has_file()]


def committed_rows(encdir: Place, sets: tuple[str, ...] | list[str] = ()) -> Any:
    """The rows of every committed tar, as one pandas DataFrame (empty if none), with, for each caption
    set in `sets`, its len_column (0: the sample lacks it) and clip_column (NaN: not scored), from the
    side files (key, length and score columns only) or, in a version 1 tar, its row file."""
    import pandas as pd
    import pyarrow.parquet as pq

    frames = []
    for p in committed_shards(encdir):
        with rows_file(p).open("rb") as f:
            rows = pq.ParquetFile(f)
            wanted = [c for c in rows.schema_arrow.names if c != "clip_embedding"]  # 1.5 kB a sample
            df = rows.read(columns=wanted).to_pandas()
        for name in sets:
            side = set_file(p, name)
            if side.has_file():
                got = pd.DataFrame(list(read_set(side, ["key", "t5_len", "clip_score"])))
                df[len_column(name)] = got["t5_len"].to_numpy() if len(got) else 0
                df[clip_column(name)] = got["clip_score"].astype(float).to_numpy() if len(got) else float("nan")
            else:
                df[len_column(name)] = df[len_column(name)] if len_column(name) in df.columns else 0
                df[clip_column(name)] = float("nan")
        frames.append(df)
    columns = INDEX_COLUMNS + [c for n in sets for c in (len_column(n), clip_column(n))]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def remove_incomplete(encdir: Place) -> int:
    """Delete temp files, tars without their row file (an interrupted run) and row files without
    their tar (a lost shard); returns how many. Each is checked by its exact name."""
    n = 0
    for folder in (_loc(encdir) / SHARDS).iterdir():
        n += atomic.clean_temp(folder)
        for tar in folder.glob("*.tar"):
            if not rows_file(tar).has_file():
                tar.unlink()
                n += 1
        for rows in folder.glob("*.parquet"):
            side = SET_FILE.match(rows.name)
            if side is not None:  # a caption set of a tar that is not committed (or was lost)
                tar = folder / f"{side['tar']}.tar"
                if not (tar.has_file() and rows_file(tar).has_file()):
                    rows.unlink()
                    n += 1
            elif not (folder / f"{rows.stem}.tar").has_file():  # its tar was lost: its samples get re-encoded
                rows.unlink()
                n += 1
    return n


def remove_stale(encdir: Place, fp: str) -> int:
    """Delete committed shards written under another fingerprint (their samples get re-encoded)."""
    n = 0
    for tar in committed_shards(encdir):
        if not tar.name.startswith(fp[:8] + "-"):
            rows_file(tar).unlink()  # the marker first: a kill between the two leaves an uncommitted tar
            tar.unlink()
            for side in tar.parent.glob(f"{tar.stem}.set-*.parquet"):
                side.unlink()
            n += 1
    return n


def set_files(tar: Place) -> dict[str, storage.Loc]:
    """{set name: side file} of one tar, from a listing (the loader looks each up by exact name instead)."""
    t = _loc(tar)
    found = (SET_FILE.match(p.name) for p in t.parent.glob(f"{t.stem}.set-*.parquet"))
    return {m["name"]: t.parent / m.group(0) for m in found if m is not None and m["tar"] == t.stem}


def shards_by_bucket(encdir: Place) -> dict[str, list[str]]:
    """{"<H>x<W>": [tar paths or URLs]} of the committed training shards."""
    out: dict[str, list[str]] = {}
    for tar in committed_shards(encdir):
        out.setdefault(tar.parent.name, []).append(str(tar))
    return out
