"""Build every tiny random-weight model the demo and the tests use, in the real on-disk formats.

Each model family's builder lives beside the loader that reads real weights (so the same code
path loads both); this module only calls them, with fixed seeds, into one cache folder:

    .cache/tiny/t5/            transformers T5EncoderModel + T5TokenizerFast (tokenizer trained offline)
    .cache/tiny/vae/           diffusers AutoencoderKL, SDXL layout at tiny widths (x8 downsampling)
    .cache/tiny/clip/          open_clip model config JSON + weights
    .cache/tiny/aesthetic.pth  LAION improved-aesthetic-predictor MLP state dict (same keys)
    .cache/tiny/captioner/     a tiny LLaVA-format image-text-to-text model + processor

Usage: python -m demo.tiny_models [DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

VERSION = "2"  # bump when a builder changes, so caches are rebuilt


def build(root: str | Path) -> Path:
    """Build (once) and return the folder; a stamp file marks a complete build."""
    from captioning import hf
    from encoders import aesthetic, t5, vae

    root = Path(root)
    stamp = root / f".complete-v{VERSION}"
    if stamp.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    t5.build_tiny(root / "t5")
    vae.build_tiny(root / "vae")
    aesthetic.build_tiny(root / "clip", root / "aesthetic.pth")
    hf.build_tiny(root / "captioner")
    stamp.write_text("ok\n")
    return root


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny")
    print(f"tiny models in {out}")
