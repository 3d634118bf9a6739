"""LAION's safety filters, both optional and off by default: NSFW (on the CLIP embedding) and watermark.

NSFW: LAION's `clip-autokeras-binary-nsfw` for ViT-L/14 is a Keras model: a Normalization layer
(mean, variance) and four Dense layers 768 -> 64 -> 512 -> 256 -> 1 with ReLU and a sigmoid. It
is read here in its PyTorch state-dict form (keys `norm.mean`, `norm.variance`, `linear_1..4`;
from the Keras file, the Dense kernels are the transposed weights; NeMo Curator ships LAION's
ViT-H/14 detector instead, which does not fit here). It runs on the same normalised embedding the aesthetic head reads: no second CLIP pass.
LAION keeps punsafe < 0.5.

Watermark: LAION's detector (`watermark_model_v1.pt`) is timm `efficientnet_b3a` with its
classifier replaced by 1536 -> 625 -> 256 -> 2, on 256 x 256 ImageNet-normalised inputs;
pwatermark = softmax[:, 0]. LAION-Aesthetics keeps pwatermark < 0.8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from encoders.aesthetic import open_rgb
from shards.errors import SigmaError

WATERMARK_SIZE = 256


class NsfwHead(nn.Module):
    """punsafe from a normalised CLIP ViT-L/14 embedding."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.norm = nn.Module()
        self.norm.register_buffer("mean", torch.zeros(dim))
        self.norm.register_buffer("variance", torch.ones(dim))
        self.linear_1, self.linear_2 = nn.Linear(dim, 64), nn.Linear(64, 512)
        self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = (emb - self.norm.mean) / self.norm.variance.sqrt()  # [N, 768]
        x = torch.relu(self.linear_1(x))  # [N, 64]
        x = torch.relu(self.linear_2(x))  # [N, 512]
        x = torch.relu(self.linear_3(x))  # [N, 256]
        return torch.sigmoid(self.linear_4(x)).reshape(-1)  # [N]


def watermark_model() -> nn.Module:
    """LAION's watermark detector architecture (random weights until a state dict is loaded)."""
    import timm

    # timm renamed `efficientnet_b3a` (LAION's name) to `efficientnet_b3`: same layers, same keys
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3),
                                     nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))
    return model


def _state_dict(path: str, key: str) -> dict:
    if not path or not Path(path).is_file():
        raise SigmaError(f"{key}: file not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


class SafetyScorer:
    """batch -> batch: fills `nsfw` from `clip_embedding` and `watermark` from `image` (NaN where off/absent)."""

    def __init__(self, nsfw_head: str | None, watermark: str | None, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.nsfw = self.watermark = None
        if nsfw_head:
            self.nsfw = NsfwHead()
            self.nsfw.load_state_dict(_state_dict(nsfw_head, "models.nsfw_head"))
            self.nsfw = self.nsfw.to(self.device).eval().requires_grad_(False)
        if watermark:
            self.watermark = watermark_model()
            self.watermark.load_state_dict(_state_dict(watermark, "models.watermark"))
            self.watermark = self.watermark.to(self.device).eval().requires_grad_(False)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        emb = np.asarray(batch["clip_embedding"], dtype=np.float32)  # [N, 768]
        n, ok = len(emb), np.any(emb, axis=1)
        batch["nsfw"] = np.full(n, np.nan, np.float32)
        batch["watermark"] = np.full(n, np.nan, np.float32)
        if self.nsfw is not None and ok.any():
            batch["nsfw"][ok] = self.nsfw(torch.from_numpy(emb[ok]).to(self.device)).cpu().numpy()
        if self.watermark is not None and ok.any():
            idx = np.flatnonzero(ok)
            pixels = torch.stack([self._pixels(batch["image"][i]) for i in idx]).to(self.device)  # [M, 3, 256, 256]
            logits = self.watermark((pixels - self.mean) / self.std)  # [M, 2]
            batch["watermark"][idx] = torch.softmax(logits.float(), dim=-1)[:, 0].cpu().numpy()
        return batch

    def _pixels(self, data) -> torch.Tensor:
        from PIL import Image

        im = open_rgb(data, WATERMARK_SIZE).resize((WATERMARK_SIZE, WATERMARK_SIZE), Image.BICUBIC)
        return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)  # [3, 256, 256]
