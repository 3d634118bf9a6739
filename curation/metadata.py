"""Decode-safe image metadata: real pixel size from the bytes, EXIF orientation, bomb guard.

The size is read from the header first, so a file declaring 100000 x 100000 pixels is rejected
(`decompression_bomb`) before a single pixel is decoded. The image is then decoded once at a
reduced scale (JPEG DCT scaling: a 4K photo decodes ~8x faster; WebP straight through libwebp,
common/images.py) into the small grey copy the
quality metrics and the perceptual hash share, and a small upright RGB JPEG (`thumb`, shortest
side 256) that the CLIP and watermark models read instead of the original (no second full decode,
and megabytes less per image through Ray's object store). A truncated or corrupt file fails here
(`not_an_image`), never later. EXIF orientations 5-8 swap width and height, as a viewer shows
them (OpenCV-based decoders ignore the tag).

Formats met on the web: MPO (Ultra HDR / multi-picture camera JPEGs) is a JPEG whose first image
is the photo: kept as `jpg`, measured on that primary image. 16-bit greyscale PNGs are scaled to
8 bits (not clipped to white). Images PIL reads but a shard does not keep (GIF, TIFF, BMP, ...)
and animated PNG/WebP (the stored file would not be the still that was scored) are
`unsupported_format`. Transparent images are composited onto neutral grey before any model or
metric sees them. A decode past `deadline` seconds (when run in a main thread, as Ray tasks are)
is a `timeout`.
"""

from __future__ import annotations

import contextlib
import io
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from common import images
from shards import reasons

FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # served formats a curated shard keeps
NEUTRAL = (128, 128, 128)  # background under transparent pixels: mid grey, neither bright nor dark
WORK_SIDE = 512  # side of the grey working copy quality + phash read
THUMB_SIDE = 256  # shortest side of the copy the models read (CLIP resizes to 224, the watermark model to 256)


@dataclass
class ImageInfo:
    reason: str | None  # None when the image decoded and passed the guard
    width: int = 0  # after EXIF orientation
    height: int = 0
    ext: str | None = None  # jpg | png | webp
    grey: Image.Image | None = None  # mode L, longest side <= WORK_SIDE, orientation applied
    thumb: bytes = b""  # JPEG, RGB, orientation applied, shortest side <= THUMB_SIDE


class _Late(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None):
    """Raise _Late in this thread after `seconds` (SIGALRM: main thread only; elsewhere no deadline).
    PIL decodes in chunks with Python between them, so the alarm lands within one chunk."""
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def late(*_):
        raise _Late()

    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def inspect(
    data: bytes,
    max_pixels: int,
    size_check: Callable[[int, int], str | None] | None = None,
    deadline: float | None = None,
) -> ImageInfo:
    """Size, format and a small grey copy of encoded bytes; a reason code instead of an exception.

    `size_check(height, width)` (upright size) may reject from the header alone: no decode is spent
    on images too small or too elongated to keep. `deadline`: seconds the whole decode may take.
    """
    if not data:
        return ImageInfo(reasons.NOT_AN_IMAGE)
    try:
        with _deadline(deadline):
            return _inspect(data, max_pixels, size_check)
    except _Late:
        return ImageInfo(reasons.TIMEOUT)


def _inspect(data: bytes, max_pixels: int, size_check) -> ImageInfo:
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL's own guard (error above 2x) follows our cap
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our check below names the size
            im = Image.open(io.BytesIO(data))
            width, height = im.size
            if width * height > max_pixels:
                return ImageInfo(reasons.DECOMPRESSION_BOMB, width, height)
            ext = FORMATS.get(im.format)
            if ext is None or (ext in ("png", "webp") and getattr(im, "is_animated", False)):
                return ImageInfo(reasons.UNSUPPORTED_FORMAT, width, height)
            orientation = im.getexif().get(images.ORIENTATION, 1)
            if orientation in (5, 6, 7, 8):
                width, height = height, width
            early = size_check(height, width) if size_check else None
            if early:
                return ImageInfo(early, width, height, ext)
            im = images.decoded(im, data, WORK_SIDE)  # truncation shows up here
            rgb = _small_rgb(im)
            if orientation in images.TRANSPOSE:
                rgb = rgb.transpose(images.TRANSPOSE[orientation])
            grey = rgb.convert("L")
            grey.thumbnail((WORK_SIDE, WORK_SIDE))
            thumb = _thumb(rgb)
    except Image.DecompressionBombError:
        return ImageInfo(reasons.DECOMPRESSION_BOMB)
    except _Late:
        raise
    except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data; all mean the same here
        return ImageInfo(reasons.NOT_AN_IMAGE)
    return ImageInfo(None, width, height, ext, grey, thumb)


def _small_rgb(im: Image.Image) -> Image.Image:
    """RGB, box-reduced by the largest integer factor that keeps both copies' sizes (longest side >=
    WORK_SIDE, shortest >= THUMB_SIDE): PNG and WebP have no DCT scaling, and every step after the
    decode at 4K (convert, transpose, resize) cost as much again as the decode itself. Transparent
    pixels are composited onto NEUTRAL."""
    if im.mode.startswith("I"):  # 16-bit grey ("I;16", or "I" from older Pillow): keep the top 8 bits
        im = Image.fromarray((np.asarray(im).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8), "L")
    alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if alpha:
        im = im.convert("RGBA")
    elif im.mode not in ("RGB", "L"):  # palette, CMYK: Image.reduce takes L, RGB, RGBA
        im = im.convert("RGB")
    factor = min(max(im.size) // WORK_SIDE, min(im.size) // THUMB_SIDE)
    if factor > 1:
        im = im.reduce(factor)
    if alpha:
        return Image.alpha_composite(Image.new("RGBA", im.size, NEUTRAL + (255,)), im).convert("RGB")
    return im.convert("RGB")


def _thumb(rgb: Image.Image) -> bytes:
    scale = THUMB_SIDE / min(rgb.size)
    if scale < 1:
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    return buf.getvalue()
