"""Curation fixtures: a folder of real images of known sizes behind a real loopback HTTP server."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from demo.images import encode, render

ROOT = Path(__file__).resolve().parents[2]

# name -> (seed, width, height, format): sizes against the PixArt-Sigma bucket tables
IMAGES = {
    "square-1k.jpg": (1, 1024, 1024, "JPEG"),  # 1k
    "hires-2k.jpg": (2, 2048, 2048, "JPEG"),  # 2k
    "uhd-4k.jpg": (3, 2880, 2880, "JPEG"),  # 4k (2880 table)
    "wide-1k.webp": (4, 1344, 768, "WEBP"),  # 1k, aspect 0.57
    "portrait-1k.png": (6, 896, 1152, "PNG"),  # 1k
    "small.jpg": (7, 800, 600, "JPEG"),  # too_small
    "panorama.jpg": (8, 4400, 1000, "JPEG"),  # aspect_ratio (h/w 0.23)
    "near-big.jpg": (5, 2100, 2100, "JPEG"),  # kept member of that group
    "fresh-1k.jpg": (10, 1024, 1024, "JPEG"),  # in no run but the incremental one
}


def exif_rotated() -> bytes:
    """1344 x 1024 pixels stored, EXIF orientation 6: shown (and measured) as 1024 wide x 1344 high."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    render(9, 1344, 1024).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("served")
    for name, (seed, w, h, fmt) in IMAGES.items():
        (d / name).write_bytes(encode(render(seed, w, h), fmt))
    near = render(5, 2100, 2100).resize((1100, 1100), Image.LANCZOS)  # same picture, smaller: near duplicate
    (d / "near-small.jpg").write_bytes(encode(near, "JPEG"))
    (d / "exact-copy.jpg").write_bytes((d / "square-1k.jpg").read_bytes())
    (d / "rotated.jpg").write_bytes(exif_rotated())
    flat = Image.new("RGB", (1200, 1200), (128, 128, 128))
    flat.save(d / "flat.png")
    return d


@pytest.fixture(scope="session")
def server(image_dir):
    from demo.serve import ImageServer

    with ImageServer(image_dir, slow_s=4) as srv:
        yield srv


@pytest.fixture(scope="session")
def curated(ray_local, tiny_models, server, tmp_path_factory):
    """The whole stage once over every kind of URL (test_pipeline.ORDER + faults): (out, manifest by
    name, stats, urls). Session-wide: the multi-node and incremental tests compare with it."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation import pipeline
    from tests.curation.test_pipeline import FAULTS, ORDER, demo_cfg

    tmp = tmp_path_factory.mktemp("curated")
    faults = server.fault_urls()
    urls = [f"{server.url}/{n}" for n in ORDER] + [faults[f] for f in FAULTS] + ["ftp://example.invalid/a.jpg"]
    names = ORDER + FAULTS + ["ftp"]
    pq.write_table(
        pa.table(
            {"url": urls, "caption": [f"alt text {n}" for n in names], "name": names, "status": ["carried"] * len(urls)}
        ),
        tmp / "urls.parquet",
    )
    stats = pipeline.run(tmp / "urls.parquet", tmp / "out", demo_cfg())
    manifest = pd.read_parquet(tmp / "out" / "manifest.parquet")
    return tmp / "out", manifest.set_index("name"), stats, urls
