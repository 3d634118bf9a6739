"""Synthetic inputs for the encode tests: curated shards + captions built here, in the real layouts.

The curated shards are real WebDataset tars in curation's layout (KEY.jpg, KEY.json, KEY.txt) and
the captions real CAPDIR parquet files (shards.format.CAPTION_COLUMNS), so these tests do not
depend on the curation or captioning code.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from shards import format as fmt

ROOT = Path(__file__).resolve().parents[2]
WORDS = "a red fox in the snow small wooden house near a lake at sunset with mountains behind it".split()


def image_bytes(width: int, height: int, seed: int, ext: str = "jpg") -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buf.getvalue()


def caption(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def write_curated(
    root: Path, shards: list[list[dict]], skip_captions: set[str] = frozenset(), failed_captions: set[str] = frozenset()
) -> tuple[Path, Path]:
    """CURDIR/shards/NNNNN.tar + CAPDIR/NNNNN.parquet from specs {key, width, height[, ext]}."""
    shard_dir, cap_dir = root / "curated" / "shards", root / "captions"
    shard_dir.mkdir(parents=True, exist_ok=True)
    cap_dir.mkdir(parents=True, exist_ok=True)
    for n, samples in enumerate(shards):
        rows = []
        with tarfile.open(shard_dir / fmt.shard_name(n), "w") as tar:
            for s in sorted(samples, key=lambda s: s["key"]):
                seed = int(s["key"])
                ext = s.get("ext", "jpg")
                members = {
                    ext: s.get("data") or image_bytes(s["width"], s["height"], seed, ext),
                    "json": json.dumps({"key": s["key"], "width": s["width"], "height": s["height"]}).encode(),
                    "txt": caption(seed + 1, 5).encode(),
                }
                for suffix, data in members.items():
                    info = tarfile.TarInfo(f"{s['key']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                if s["key"] in skip_captions:
                    continue
                failed = s["key"] in failed_captions
                rows.append(
                    dict(
                        key=s["key"],
                        caption=None if failed else caption(seed, 6 + seed % 20),
                        captioner="test",
                        prompt="Describe.",
                        original_caption=members["txt"].decode(),
                        num_tokens=0,
                        status="failed" if failed else "kept",
                        reason="caption_error" if failed else "",
                    )
                )
        table = (
            pa.Table.from_pylist(rows)
            if rows
            else pa.table({c: pa.array([], pa.string()) for c in fmt.CAPTION_COLUMNS})
        )
        pq.write_table(table.select(fmt.CAPTION_COLUMNS), cap_dir / f"{n:05d}.parquet")
    return shard_dir, cap_dir


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a tar short, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def sample(key: int, width: int, height: int, **kw) -> dict:
    return {"key": f"{key:09d}", "width": width, "height": height, **kw}


def write_encdir(
    encdir: Path,
    buckets: dict[tuple[int, int], int],
    dim: int = 8,
    shard_bytes: int = 6000,
    sets: dict[str, Callable[[int], tuple[int, float | None] | None]] | None = None,
) -> dict[str, dict]:
    """An ENCDIR written with the real writer, without Ray or models: known tensors per key.

    Without `sets`, a version 1 folder (captions inside the tars): sample i of a bucket has recaption
    features filled with +i (length 3 + i % 5) and, for even i, original features filled with -i
    (length 2). With `sets` {name: i -> (length, clip score) or None (no caption)}: a version 2 folder
    whose set `name` of sample i is `length` rows filled with i + 1000 * (position of name), caption
    "<name> <i>". Latent mean = i, std = 0 except every third sample (0.5).
    """
    import torch

    from shards import encoded

    truth, fp, n = {}, "f" * 16, 0
    names = tuple(sets or ())
    for (h, w), count in buckets.items():
        writer = encoded.BucketWriter(encdir, (h, w), fp, shard_bytes, sets=names)
        for _ in range(count):
            key, i = f"{n:06d}", n
            n += 1
            feats = {"recaption": torch.full((3 + i % 5, dim), float(i))}
            if i % 2 == 0:
                feats["original"] = torch.full((2, dim), -float(i))
            side = {}
            for j, name in enumerate(names):
                got = sets[name](i)
                if got is not None:
                    side[name] = (f"{name} {i}", torch.full((got[0], dim), float(i + 1000 * j)), got[1])
            mean = torch.full((4, h // 8, w // 8), float(i))
            std = torch.zeros_like(mean) if i % 3 else torch.full_like(mean, 0.5)
            meta = {
                "key": key,
                "bucket": f"{h / w:.2f}",
                "bucket_hw": [h, w],
                "size": [h, w],
                "resized": [h, w],
                "crop_box": [0, 0, w, h],
                "source": "00000.tar",
                "fingerprint": fp,
                "format_version": encoded.FORMAT_VERSION if sets else 1,
            }
            row = dict(
                key=key,
                status="kept",
                reason="",
                bucket=meta["bucket"],
                bucket_h=h,
                bucket_w=w,
                width=w,
                height=h,
                source="00000.tar",
                fingerprint=fp,
            )
            if not sets:
                meta["captions"] = {"recaption": f"re {i}", **({"original": f"orig {i}"} if i % 2 == 0 else {})}
                meta["t5_lengths"] = {k: len(v) for k, v in feats.items()}
                row.update(t5_len_recaption=len(feats["recaption"]), t5_len_original=len(feats.get("original", [])))
            t5 = None if sets else encoded.pack_t5(feats)
            writer.write(meta, t5, encoded.pack_vae(mean, std, 0.13025), row, side)
            truth[key] = {
                "i": i,
                "hw": (h, w),
                "std": float(std.flatten()[0]),
                "sets": {k: v[1] for k, v in side.items()},
            }
        writer.close()
    from safetensors.torch import save_file

    save_file({"y_embedding": torch.zeros(300, dim)}, str(encdir / "null_caption.safetensors"))
    info = dict(
        fingerprint=fp,
        tier="256",
        table="256",
        max_length=300,
        t5_dim=dim,
        scaling_factor=0.13025,
        latent_channels=4,
        null_caption="null_caption.safetensors",
    )
    if sets:
        info["caption_sets"] = {name: {"from": "test", "stored": "side"} for name in names}
    else:
        info["format_version"] = 1
    encoded.write_info(encdir, info)
    return truth
