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

and mirrors it to ~/.cache/sigmaforge/tiny ($SIGMAFORGE_CACHE), where a Ray job finds it.

Usage: python -m demo.tiny_models [DIR]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

VERSION = "3"  # bump when a builder changes, so caches are rebuilt


def build(root: str | Path) -> Path:
    """Build (once) and return the folder; a stamp file marks a complete build."""
    from encoders import aesthetic, reward, t5, vae, vlm

    root = Path(root)
    stamp = root / f".complete-v{VERSION}"
    if not stamp.exists():
        root.mkdir(parents=True, exist_ok=True)
        t5.build_tiny(root / "t5")
        vae.build_tiny(root / "vae")
        aesthetic.build_tiny(root / "clip", root / "aesthetic.pth")
        vlm.build_tiny(root / "captioner")
        reward.build_tiny_hps(root / "hps" / "hps-tiny.pt", root / "clip")
        reward.build_tiny_pickscore(root / "pickscore")
        stamp.write_text("ok\n")
    mirror(root)
    return root


def mirror(root: Path) -> None:
    """Copy the tiny models to USER_CACHE/tiny (once per version), where a Ray job's driver finds them
    although `--working-dir .` does not upload the git-ignored .cache/ (common/config.py)."""
    from common.config import USER_CACHE

    target = USER_CACHE / "tiny"
    if (target / f".complete-v{VERSION}").exists() or target.resolve() == root.resolve():
        return
    USER_CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=USER_CACHE))
    shutil.copytree(root, tmp, dirs_exist_ok=True)
    shutil.rmtree(target, ignore_errors=True)  # an older version
    try:
        tmp.rename(target)
    except OSError:  # another process mirrored it first: same deterministic bytes
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    out = build(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny")
    print(f"tiny models in {out}")
