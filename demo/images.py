"""The bundled demo image set, generated deterministically (no download needed).

Mixed sizes so every curation rule has something to act on: a few below 1K (`too_small`), most
between 1K and 2K, a few at 2K and one at 4K, one panorama outside the 1:4 range
(`aspect_ratio`), an exact and a near duplicate, a flat grey image (`low_quality`), and two
broken files (an HTML page saved as .jpg, a truncated JPEG). Captions are alt-text-like.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

# (name, width, height, format) — sizes chosen against the PixArt-Sigma bucket tables:
# 1024x1024 covers the 1k square bucket; 2048x2048 the 2k; 2880x2880 the 4k (2880 table).
IMAGES = [
    ("small-a", 800, 600, "JPEG"),
    ("small-b", 960, 960, "PNG"),
    ("small-c", 640, 1136, "WEBP"),
    ("square-a", 1024, 1024, "JPEG"),
    ("square-b", 1100, 1100, "PNG"),
    ("landscape-a", 1344, 768, "JPEG"),
    ("landscape-b", 1536, 640, "WEBP"),
    ("landscape-c", 1280, 960, "JPEG"),
    ("landscape-d", 1600, 1000, "JPEG"),
    ("portrait-a", 768, 1344, "JPEG"),
    ("portrait-b", 896, 1152, "PNG"),
    ("portrait-c", 1000, 1500, "JPEG"),
    ("wide-a", 1792, 1024, "JPEG"),
    ("tall-a", 1024, 1792, "WEBP"),
    ("square-c", 1200, 1200, "JPEG"),
    ("landscape-e", 1440, 1080, "PNG"),
    ("hires-a", 2048, 2048, "JPEG"),
    ("hires-b", 2560, 1440, "JPEG"),
    ("hires-c", 1536, 2752, "JPEG"),
    ("uhd-a", 2880, 2880, "JPEG"),
    ("panorama", 4400, 1000, "JPEG"),
    ("flat-grey", 1200, 1200, "PNG"),
]
CAPTIONS = {
    "square": "a colourful abstract composition",
    "landscape": "landscape wallpaper with shapes",
    "portrait": "portrait poster design",
    "wide": "wide banner artwork",
    "tall": "tall phone wallpaper",
    "hires": "high resolution digital art",
    "uhd": "4k ultra hd wallpaper",
    "small": "thumbnail picture",
    "panorama": "panoramic photo",
    "flat": "grey background",
}


def render(seed: int, width: int, height: int) -> Image.Image:
    """A structured picture: gradient sky, overlapping shapes, a little grain (sharp edges pass blur checks)."""
    rng = random.Random(seed)
    top = tuple(rng.randrange(256) for _ in range(3))
    bottom = tuple(rng.randrange(256) for _ in range(3))
    small = Image.new("RGB", (64, 64))
    small.putdata([tuple(int(a + (b - a) * y / 63) for a, b in zip(top, bottom)) for y in range(64) for _ in range(64)])
    img = small.resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        w, h = rng.randrange(width // 10, width // 2), rng.randrange(height // 10, height // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour, outline=(0, 0, 0), width=max(2, width // 300))
        else:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour, outline=(255, 255, 255), width=max(2, width // 300))
    grain = Image.effect_noise((width, height), 40).convert("RGB")
    return Image.blend(img, grain, 0.06)


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def write(folder: str | Path) -> list[dict]:
    """Write the demo set into `folder`; returns rows (file, caption) for the URL list. Idempotent."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, w, h, fmt) in enumerate(IMAGES):
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        path = folder / f"{name}.{ext}"
        if not path.exists():
            img = Image.new("RGB", (w, h), (128, 128, 128)) if name == "flat-grey" else render(i, w, h)
            path.write_bytes(encode(img, fmt))
        rows.append({"file": path.name, "caption": CAPTIONS[name.split("-")[0]]})
    # An exact duplicate (same bytes, other name) and a near duplicate (re-encoded, slightly smaller).
    exact = folder / "square-a-copy.jpg"
    near = folder / "landscape-c-resized.jpg"
    if not exact.exists():
        exact.write_bytes((folder / "square-a.jpg").read_bytes())
    if not near.exists():
        src = Image.open(folder / "landscape-c.jpg")
        near.write_bytes(encode(src.resize((1216, 912), Image.LANCZOS).filter(ImageFilter.SMOOTH), "JPEG"))
    rows += [{"file": exact.name, "caption": CAPTIONS["square"]}, {"file": near.name, "caption": CAPTIONS["landscape"]}]
    # Two broken files.
    html, trunc = folder / "not-an-image.jpg", folder / "truncated.jpg"
    html.write_bytes(b"<!doctype html><html><body>404 page that says 200</body></html>")
    if not trunc.exists():
        trunc.write_bytes((folder / "landscape-a.jpg").read_bytes()[:4000])
    rows += [{"file": html.name, "caption": "broken link"}, {"file": trunc.name, "caption": "cut off download"}]
    return rows
