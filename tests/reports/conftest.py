"""Fake-but-real run folders for the report tests, and the headless Chromium they open reports in.

Pages are opened as file:// URLs, the way a person opens a report copied off a cluster, and
checked through Playwright (tests/chromium.py): console errors, uncaught exceptions and
failed resource loads, then the DOM is queried and a full-page screenshot is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.chromium import Page, chromium


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A function path -> loaded Page, backed by one headless Chromium for the whole session."""
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as new_page:

        def open_page(path: Path) -> Page:
            page = new_page()
            page.open(path)
            return page

        yield open_page


# ---------------------------------------------------------------------------------------------
# A small curated run folder: real manifest parquet, real tars with real images, thumbnails
# ---------------------------------------------------------------------------------------------


def image_bytes(seed: int, fmt: str = "JPEG", size: tuple[int, int] = (96, 64)) -> bytes:
    """A small real image with some structure (gradient + noise), distinct per seed."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    base = np.linspace(0, 255, w)[None, :, None] * rng.uniform(0.2, 1.0, (1, 1, 3))  # [1, w, 3]
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)  # [h, w, 3]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> None:
    import io
    import tarfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))


# (key, status, reason, aesthetic, dup_of, has thumbnail); kept rows get shard files
CURATED_ROWS = [
    *[(f"k{i:03d}", "kept", "", 4.0 + 0.5 * i, "", False) for i in range(8)],
    ("s000", "rejected", "too_small", 6.0, "", True),
    ("s001", "rejected", "too_small", 5.5, "", True),
    ("s002", "rejected", "too_small", 5.0, "", False),
    ("q000", "rejected", "low_quality", 5.2, "", True),
    ("q001", "rejected", "low_quality", 4.8, "", True),
    ("a000", "rejected", "low_aesthetic", 3.1, "", True),
    ("d000", "rejected", "duplicate", 5.9, "k000", True),
    ("d001", "rejected", "duplicate", 5.8, "k000", True),
    ("d002", "rejected", "duplicate", 6.1, "k001", True),
    ("f000", "failed", "http_404", None, "", False),
    ("f001", "failed", "http_404", None, "", False),
    ("f002", "failed", "timeout", None, "", False),
]


@pytest.fixture
def curated_dir(tmp_path) -> Path:
    """CURDIR with manifest.parquet, shards/00000.tar + 00001.tar (8 kept images), thumbs/, stats.json."""
    import pandas as pd

    from curation.report import save_thumbnail
    from shards import format

    curdir = tmp_path / "curated"
    rows, shards = [], {0: {}, 1: {}}
    for i, (key, status, reason, aesthetic, dup_of, thumb) in enumerate(CURATED_ROWS):
        failed = status == "failed"
        fmt, ext = [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")][i % 3]
        data = image_bytes(i, fmt)
        shard = None
        if status == "kept":
            shard = i % 2
            shards[shard].update(
                {
                    f"{key}.{ext}": data,
                    f"{key}.json": json.dumps({"key": key}).encode(),
                    f"{key}.txt": f"alt text {key}".encode(),
                }
            )
        if thumb:
            assert save_thumbnail(curdir, key, data)
        rows.append(
            {
                "url": f"http://127.0.0.1:9/{key}.{ext}",
                "key": key,
                "status": status,
                "reason": reason,
                "width": None if failed else 1024 + 64 * i,
                "height": None if failed else 768 + 128 * (i % 5),
                "tier": None if failed else ("2k" if i % 4 == 0 else "1k"),
                "aesthetic": aesthetic,
                "sharpness": None if failed else 10.0 + 15 * i,
                "contrast": None if failed else 8.0 + 3 * i,
                "brightness": None if failed else 40.0 + 9 * i,
                "nsfw": None,
                "watermark": None if failed else 0.05 * i,
                "sha256": f"{i:064x}",
                "phash": f"{i:016x}",
                "dup_of": dup_of or None,
                "shard": format.shard_name(shard) if shard is not None else None,
                "caption": f"alt text {key}",
            }
        )
    for index, members in shards.items():
        write_tar(curdir / "shards" / format.shard_name(index), members)
    pd.DataFrame(rows).to_parquet(curdir / format.MANIFEST)
    (curdir / "stats.json").write_text(json.dumps({"urls": len(rows), "kept": 8}))
    return curdir


# ---------------------------------------------------------------------------------------------
# A small caption run: curated tars + CAPDIR/NNNNN.parquet
# ---------------------------------------------------------------------------------------------

WORDS = "a red fox sits in deep snow under pale golden light near a wooden fence".split()


@pytest.fixture
def caption_run(tmp_path):
    """Two curated shards (5 + 4 images) and their caption files: one failed row, two over 300 tokens."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import format

    curdir, capdir = tmp_path / "curated", tmp_path / "captions"
    capdir.mkdir()
    layout = {0: [f"a{i:03d}" for i in range(5)], 1: [f"b{i:03d}" for i in range(4)]}
    tokens = iter([12, 40, 77, 150, 240, 299, 301, 420, 0])
    for shard, keys in layout.items():
        members, rows = {}, []
        for i, key in enumerate(keys):
            members[f"{key}.jpg"] = image_bytes(10 * shard + i)
            members[f"{key}.txt"] = f"alt {key}".encode()
            n = next(tokens)
            failed = key == "b003"
            caption = "" if failed else " ".join(WORDS[j % len(WORDS)] for j in range(n)).capitalize() + "."
            rows.append(
                {
                    "key": key,
                    "caption": caption,
                    "captioner": "tiny@local",
                    "prompt": "Describe.",
                    "original_caption": f"alt {key}",
                    "num_tokens": n,
                    "status": "failed" if failed else "kept",
                    "reason": "caption_error" if failed else "",
                }
            )
        write_tar(curdir / "shards" / format.shard_name(shard), members)
        table = pa.Table.from_pylist(rows).select(format.CAPTION_COLUMNS)
        pq.write_table(
            table.set_column(5, "num_tokens", table["num_tokens"].cast(pa.int32())), capdir / f"{shard:05d}.parquet"
        )
    return curdir, capdir


# ---------------------------------------------------------------------------------------------
# Training runs: stage folders as training/finetune.py writes them
# ---------------------------------------------------------------------------------------------


def grid_png(seed: int, size: tuple[int, int] = (128, 64)) -> bytes:
    return image_bytes(seed, "PNG", size)


@pytest.fixture
def training_runs(tmp_path):
    """runs/256 (TensorBoard events, 2 grids), runs/512 (log.txt only, 1 grid), runs/1k (log only, no grid)."""
    from torch.utils.tensorboard import SummaryWriter

    runs = tmp_path / "runs"
    first = runs / "256"
    (first / "samples").mkdir(parents=True)
    (first / "run.json").write_text(json.dumps({"stage": "256", "chain": ["256"]}))
    writer = SummaryWriter(str(first / "tb"))
    for step in range(10, 310, 10):
        for tag, value in (
            ("train/loss", 1.0 / step),
            ("train/lr", 1e-3 * min(1, step / 100)),
            ("train/grad_norm", 0.5),
            ("perf/samples_per_s", 40.0),
            ("perf/step_time_s", 0.2),
        ):
            writer.add_scalar(tag, value, step)
    writer.close()
    (first / "samples" / "step-0000100.png").write_bytes(grid_png(1))
    (first / "samples" / "step-0000300.png").write_bytes(grid_png(2, (160, 80)))

    second = runs / "512"
    (second / "samples").mkdir(parents=True)
    (second / "run.json").write_text(json.dumps({"stage": "512", "chain": ["256", "512"]}))
    (second / "log.txt").write_text(
        "stage 512 (256 -> 512): 20 steps, 1 process(es) x batch 4 x accum 1 = 4 per step, data enc\n"
        "step 10/20 loss 0.250000 lr 5.000e-04 grad_norm 0.3000 samples/s 12.0 step_time 0.333s\n"
        "saved runs/512/checkpoints/step-0000010\n"
        "step 20/20 loss 0.125000 lr 1.000e-03 grad_norm 0.2000 samples/s 14.0 step_time 0.286s\n"
    )
    (second / "samples" / "step-0000020.png").write_bytes(grid_png(3, (96, 48)))

    third = runs / "1k"
    third.mkdir()
    (third / "log.txt").write_text("step 5/10 loss 0.5 lr 1e-3 grad_norm nan samples/s 2.0 step_time 1.0s\n")
    return runs
