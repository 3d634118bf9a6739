"""common/images.py: the WebP fast path gives PIL's pixels; thumbnails are upright."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from common import images, pages
from demo.images import render


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode,kw", [("RGB", {"quality": 80}), ("RGBA", {"lossless": True}), ("RGBA", {"quality": 70})])
def test_webp_decodes_to_the_same_pixels_as_pil(mode, kw):
    im = render(3, 640, 480).convert(mode)
    if mode == "RGBA":
        a = np.asarray(im).copy()
        a[:100, :, 3] = 40  # partly transparent: alpha must survive the decode
        im = Image.fromarray(a, "RGBA")
    data = _save(im, "WEBP", **kw)
    pil = Image.open(io.BytesIO(data))
    pil.load()
    ours = images.decode_webp(data)
    assert ours.mode == pil.mode == mode
    assert np.array_equal(np.asarray(ours), np.asarray(pil))


def test_a_corrupt_webp_raises():
    data = _save(render(3, 256, 256), "WEBP", quality=90)
    with pytest.raises(ValueError):
        images.decode_webp(data[:100])


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_thumbnails_apply_exif_orientation(fmt):
    wide = render(5, 640, 320)  # 640 wide, 320 high
    exif = Image.Exif()
    exif[images.ORIENTATION] = 6  # shown rotated by 90 degrees: 320 wide, 640 high
    data = _save(wide, fmt, exif=exif.tobytes())
    thumb = images.upright_thumbnail(data, 128)
    assert thumb.mode == "RGB" and thumb.size == (64, 128)
    uri = pages.thumbnail_uri(data, 128)
    assert uri is not None and uri.startswith("data:image/jpeg;base64,")
    found = pages.thumbnail_uris({"a": data, "b": b"not an image"}, 128)
    assert found["a"] == uri and found["b"] is None
