"""Aesthetic score: open_clip image embedding + the LAION improved-aesthetic-predictor MLP.

The LAION heads were trained on L2-normalised OpenAI CLIP ViT-L/14 image embeddings, and OpenAI's
CLIP uses QuickGELU: load `ViT-L-14-quickgelu` (open_clip's plain `ViT-L-14` uses GELU and the
scores drift). The head (`sac+logos+ava1-l14-linearMSE.pth`) is a plain state dict of an MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between (keys layers.0/2/4/6/7); scores ~1-10.

`AestheticScorer` is the Ray stage: one CLIP pass per batch gives the score and keeps the
normalised embedding, which dedup (near duplicates) and the safety heads reuse.
`build_tiny` writes a random-weight tiny CLIP + head of the same formats for offline tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shards.errors import SigmaError

EMBED_DIM = 768  # OpenAI CLIP ViT-L/14 image embedding: what the LAION heads read
TINY_ARCH = "tiny-clip"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class AestheticHead(nn.Module):
    """LAION improved aesthetic predictor; same module layout, so the released state dict loads."""

    def __init__(self, dim: int = EMBED_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.layers(emb)  # [N, 768] -> [N, 1]


def load_clip(
    arch: str,
    weights: str,
    config_dir: str | None = None,
    device: str | torch.device = "cpu",
    key: str = "models.clip.weights",
):
    """(model, image preprocess, tokenizer) from an open_clip tag (`openai`) or a local weights file.

    `config_dir` holds extra model-config JSONs (the tiny offline model); a local `.safetensors`,
    `.pt` or `.bin` file is read by open_clip itself (torch files with weights_only=True).
    """
    import open_clip

    from encoders import hub

    if config_dir:
        open_clip.add_model_config(str(config_dir))
    hub.require_clip(arch, weights, key)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights or None, device=device)
    model.eval().requires_grad_(False)
    return model, preprocess, open_clip.get_tokenizer(arch)


def load_head(path: str, device: str | torch.device = "cpu") -> AestheticHead:
    """The LAION MLP head from its state dict (torch.load with weights_only=True, or .safetensors)."""
    if not path or not Path(path).is_file():
        raise SigmaError(f"models.aesthetic_head: file not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    head = AestheticHead(state["layers.0.weight"].shape[1])
    head.load_state_dict(state)
    return head.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The Ray stage
# ---------------------------------------------------------------------------------------------


def open_rgb(data, size: int | None = None):
    """PIL RGB image from bytes / PIL / HxWx3 uint8, EXIF orientation applied.

    With `size`, JPEGs are decoded at a reduced scale (libjpeg DCT scaling) no smaller than 2x
    `size`: a 4K photo then decodes ~8x faster and CLIP sees the same 224-px input.
    """
    from PIL import Image, ImageOps

    if isinstance(data, (bytes, bytearray, memoryview)):
        im = Image.open(io.BytesIO(bytes(data)))
        if size:
            im.draft("RGB", (2 * size, 2 * size))
    elif isinstance(data, np.ndarray):
        im = Image.fromarray(data)
    else:
        im = data
    return ImageOps.exif_transpose(im).convert("RGB")


class AestheticScorer:
    """batch -> batch: adds `aesthetic` [N] float32 and `clip_embedding` [N, 768] float32 (L2-normalised).

    The input column `image` holds encoded bytes, PIL images or uint8 arrays. Rows whose
    `image` is empty/None (already failed upstream) or cannot be decoded get NaN scores and zero
    embeddings, so a batch never fails for one bad image.
    """

    def __init__(
        self,
        clip_arch: str,
        clip_weights: str,
        clip_config_dir: str | None,
        aesthetic_head: str,
        device: str | None = None,
        image_column: str = "image",
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.clip, self.preprocess, _ = load_clip(clip_arch, clip_weights, clip_config_dir, self.device)
        self.head = load_head(aesthetic_head, self.device)
        self.size = _image_size(self.clip)
        self.image_column = image_column

    @torch.no_grad()
    def embed(self, images: list) -> tuple[np.ndarray, np.ndarray]:
        """(L2-normalised embeddings [N, E], ok mask [N]) for a list of images (bytes/PIL/arrays)."""
        pixels, ok = [], np.zeros(len(images), dtype=bool)
        for i, data in enumerate(images):
            if data is None or (isinstance(data, (bytes, bytearray)) and not data):
                continue
            try:
                pixels.append(self.preprocess(open_rgb(data, self.size)))  # [3, s, s]
                ok[i] = True
            except Exception:  # noqa: BLE001 - a corrupt image is data, not a crash
                continue
        dim = self.clip.visual.output_dim
        out = np.zeros((len(images), dim), dtype=np.float32)
        if pixels:
            emb = self.clip.encode_image(torch.stack(pixels).to(self.device)).float()  # [M, E]
            emb = emb / emb.norm(dim=-1, keepdim=True).clamp(min=1e-12)
            out[ok] = emb.cpu().numpy()
        return out, ok

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        emb, ok = self.embed(list(batch[self.image_column]))
        scores = np.full(len(ok), np.nan, dtype=np.float32)
        if ok.any():
            x = torch.from_numpy(emb[ok]).to(self.device)  # [M, 768]
            scores[ok] = self.head(x).float().reshape(-1).cpu().numpy()  # [M]
        batch["aesthetic"] = scores
        batch["clip_embedding"] = emb
        return batch


def _image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


# ---------------------------------------------------------------------------------------------
# Tiny offline model
# ---------------------------------------------------------------------------------------------

# ViT-L-14-quickgelu's layout at toy widths; embed_dim stays 768 so the LAION head shape matches.
TINY_CONFIG = {
    "embed_dim": EMBED_DIM,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny(clip_dir: str | Path, head_path: str | Path, seed: int = 0) -> None:
    """Write `clip_dir/tiny-clip.json` + `tiny-clip.safetensors` and a LAION-format head at `head_path`."""
    import open_clip
    from safetensors.torch import save_file

    clip_dir, head_path = Path(clip_dir), Path(head_path)
    clip_dir.mkdir(parents=True, exist_ok=True)
    (clip_dir / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CONFIG, indent=2) + "\n")
    open_clip.add_model_config(str(clip_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(clip_dir / f"{TINY_ARCH}.safetensors"))
    torch.manual_seed(seed + 1)
    head = AestheticHead()
    head_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), head_path)
