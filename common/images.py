"""Image decoding shared by curation's measure step and every page's thumbnails.

Decoding dominates curation's CPU time, and on the web many images are 4K WebP: Pillow (>= 11)
decodes every WebP through its animation decoder into RGBA, where OpenCV calls libwebp straight
into RGB: the same pixels (tests compare them) for ~8 % less CPU on 4K photos (14 files, 3 rounds:
3.9 vs 4.2 CPU s including the reduction measure does next).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

ORIENTATION = 0x0112  # the EXIF tag
TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # EXIF orientation -> the transpose that shows the image upright


def decode_webp(data: bytes) -> Image.Image:
    """A still WebP's pixels, RGB or RGBA, EXIF orientation not applied (as PIL's load); ValueError
    if libwebp cannot decode it (truncated, corrupt)."""
    import cv2

    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)  # UNCHANGED: alpha kept, EXIF ignored
    if a is None or a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError("WebP did not decode")
    alpha = a.shape[2] == 4
    cv2.cvtColor(a, cv2.COLOR_BGRA2RGBA if alpha else cv2.COLOR_BGR2RGB, dst=a)
    return Image.fromarray(a, "RGBA" if alpha else "RGB")


def decoded(im: Image.Image, data: bytes, side: int) -> Image.Image:
    """`im` (opened from `data`, not loaded) decoded: a still WebP through libwebp, a JPEG at the
    smallest DCT scale that keeps both sides >= `side`, anything else as PIL decodes it."""
    if im.format == "WEBP" and not getattr(im, "is_animated", False):
        return decode_webp(data)
    im.draft("RGB", (side, side))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale
    im.load()  # full decode of the (scaled) stream: truncation shows up here
    return im


def upright_thumbnail(data: bytes, side: int) -> Image.Image:
    """RGB, longest side <= `side`, EXIF orientation applied; PIL's exceptions for undecodable data."""
    im = Image.open(io.BytesIO(data))
    orientation = im.getexif().get(ORIENTATION, 1)
    pic = decoded(im, data, side)
    if orientation in TRANSPOSE:
        pic = pic.transpose(TRANSPOSE[orientation])
    if pic.mode != "RGB":
        pic = pic.convert("RGB")
    pic.thumbnail((side, side))
    return pic
