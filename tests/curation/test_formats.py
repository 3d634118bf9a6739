"""Formats met on the web, as real files: MPO, 16-bit grey PNG, GIF/TIFF/BMP, animated PNG/WebP, alpha."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from curation import metadata, quality
from demo.images import render
from shards import reasons

MAX_PIXELS = 64_000_000


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_mpo_is_kept_as_jpeg_measured_on_its_primary_image():
    primary, depth = render(1, 1024, 768), render(2, 320, 240)
    data = _save(primary, "MPO", save_all=True, append_images=[depth])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    info = metadata.inspect(data, MAX_PIXELS)
    assert info.reason is None and info.ext == "jpg"
    assert (info.width, info.height) == (1024, 768)
    plain = metadata.inspect(_save(primary, "JPEG"), MAX_PIXELS)
    assert abs(quality.metrics(info.grey)["brightness"] - quality.metrics(plain.grey)["brightness"]) < 2


def test_16_bit_grey_png_is_scaled_not_clipped():
    rng = np.random.default_rng(0)
    grey8 = np.asarray(render(3, 1024, 1024).convert("L"), dtype=np.uint16)
    grey16 = (grey8 * 257 + rng.integers(0, 256, grey8.shape)).astype(np.uint16)  # full 16-bit range
    data = _save(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    info = metadata.inspect(data, MAX_PIXELS)
    assert info.reason is None and info.ext == "png"
    m = quality.metrics(info.grey)
    assert abs(m["brightness"] - grey8.mean()) < 3, m  # today: all white (255), low_quality
    assert quality.verdict(m, 20.0, 10.0, 10.0, 245.0) is None
    thumb = np.asarray(Image.open(io.BytesIO(info.thumb)).convert("L"), np.float32)
    assert 20 < thumb.mean() < 235


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP"])
def test_other_image_formats_are_unsupported_not_broken(fmt):
    info = metadata.inspect(_save(render(4, 1024, 1024), fmt), MAX_PIXELS)
    assert info.reason == reasons.UNSUPPORTED_FORMAT and (info.width, info.height) == (1024, 1024)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animated_png_and_webp_are_unsupported(fmt):
    frames = [render(5, 1024, 1024), render(6, 1024, 1024)]
    data = _save(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "is_animated", False)
    assert metadata.inspect(data, MAX_PIXELS).reason == reasons.UNSUPPORTED_FORMAT
    still = metadata.inspect(_save(frames[0], fmt), MAX_PIXELS)  # the same picture as a still is fine
    assert still.reason is None


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_transparent_pixels_are_composited_on_neutral_grey(fmt):
    rgba = render(7, 1024, 1024).convert("RGBA")
    a = np.asarray(rgba).copy()
    a[:, :512, :3] = 255  # white (or any colour) under fully transparent pixels: must not show
    a[:, :512, 3] = 0
    data = _save(Image.fromarray(a, "RGBA"), fmt, lossless=True) if fmt == "WEBP" else _save(Image.fromarray(a), fmt)
    info = metadata.inspect(data, MAX_PIXELS)
    assert info.reason is None
    thumb = np.asarray(Image.open(io.BytesIO(info.thumb)).convert("RGB"), np.float32)
    left = thumb[:, : thumb.shape[1] // 2 - 8]
    assert np.abs(left - np.array(metadata.NEUTRAL)).max() < 6  # the models see grey, not white
    grey = np.asarray(info.grey, np.float32)
    assert abs(grey[:, : grey.shape[1] // 2 - 8].mean() - 128) < 3


def test_html_is_still_not_an_image():
    assert metadata.inspect(b"<!doctype html><html></html>", MAX_PIXELS).reason == reasons.NOT_AN_IMAGE


def test_a_decode_past_its_deadline_is_a_timeout():
    data = _save(Image.effect_noise((2048, 2048), 64).convert("RGB"), "PNG", compress_level=1)  # ~0.1 s to decode
    assert metadata.inspect(data, MAX_PIXELS, deadline=0.002).reason == reasons.TIMEOUT
    assert metadata.inspect(data, MAX_PIXELS, deadline=30).reason is None  # and the alarm is gone afterwards


def test_truncated_webp_is_not_an_image():
    data = _save(render(3, 1024, 1024), "WEBP", quality=90)
    assert metadata.inspect(data[: len(data) // 2], MAX_PIXELS).reason == reasons.NOT_AN_IMAGE
