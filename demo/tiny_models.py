"""Build every tiny random-weight model the demo and the tests use, in the real on-disk formats.

Each model family's builder lives beside the loader that reads real weights (so the same code
path loads both); this module only calls them, with fixed seeds, into one cache folder:

    .cache/tiny/t5/            transformers T5EncoderModel + T5TokenizerFast (tokenizer trained offline)
    .cache/tiny/vae/           diffusers AutoencoderKL, SDXL layout at tiny widths (x8 downsampling)
    .cache/tiny/clip/          open_clip model config JSON + weights
    .cache/tiny/aesthetic.pth  LAION improved-aesthetic-predictor MLP state dict (same keys)
    .cache/tiny/captioner/     a tiny LLaVA-format image-text-to-text model + processor (also the demo's VLM judge)
    .cache/tiny/hps/hps-tiny.pt  HPSv2-format open_clip weights ({"state_dict": ...}) of the tiny CLIP layout
    .cache/tiny/pickscore/     PickScore-format HF CLIPModel + CLIPProcessor

Usage: python -m demo.tiny_models [DIR]
"""
from __future__ import annotations

import sys
from pathlib import Path

VERSION = "3"  # bump when a builder changes, so caches are rebuilt


def build(root: str | Path) -> Path:
    """Build (once) and return the folder; a stamp file marks a complete build."""
    from encoders import aesthetic, reward, t5, vae, vlm

    root = Path(root)
    stamp = root / f".complete-v{VERSION}"
    if stamp.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    t5.build_tiny(root / "t5")
    vae.build_tiny(root / "vae")
    aesthetic.build_tiny(root / "clip", root / "aesthetic.pth")
    vlm.build_tiny(root / "captioner")
    reward.build_tiny_hps(root / "hps" / "hps-tiny.pt", root / "clip")
    reward.build_tiny_pickscore(root / "pickscore")
    stamp.write_text("ok\n")
    return root


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny")
    print(f"tiny models in {out}")
