"""LAION's safety filters, both optional and off by default: NSFW (on the CLIP embedding) and watermark.

NSFW: LAION's `clip-autokeras-binary-nsfw` for ViT-L/14 is a Keras model: a Normalization layer
(mean, variance) and four Dense layers 768 -> 64 -> 512 -> 256 -> 1 with ReLU and a sigmoid. It
is read here in its PyTorch state-dict form (keys `norm.mean`, `norm.variance`, `linear_1..4`;
from the Keras file, the Dense kernels are the transposed weights; `curation/convert_nsfw_head`
writes it; NeMo Curator ships LAION's ViT-H/14 detector instead, which does not fit here). Before
the Normalization, autokeras reads 5 of the 768 columns as categories: the value's `%f` text is
looked up in a vocabulary (unseen: 0); the converter keeps those vocabularies as `lookup.*`, and
without them the head is off by up to 0.09 (LAION's own ported `.pth` has none). It runs on the same
normalised embedding the aesthetic head reads: no second CLIP pass. LAION keeps punsafe < 0.5.

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

    def __init__(self, dim: int = 768, n_lookup: int = 0, lookup_size: int = 0):
        super().__init__()
        self.norm = nn.Module()
        self.norm.register_buffer("mean", torch.zeros(dim))
        self.norm.register_buffer("variance", torch.ones(dim))
        # autokeras' category columns: `keys` (the `%f` text in millionths, sorted per column) and
        # their vocabulary `index`, column i in keys[offsets[i]:offsets[i + 1]]
        self.lookup = nn.Module()
        self.lookup.register_buffer("columns", torch.zeros(n_lookup, dtype=torch.long))
        self.lookup.register_buffer("offsets", torch.zeros(n_lookup + 1, dtype=torch.long))
        self.lookup.register_buffer("keys", torch.zeros(lookup_size, dtype=torch.long))
        self.lookup.register_buffer("index", torch.zeros(lookup_size))
        self.linear_1, self.linear_2 = nn.Linear(dim, 64), nn.Linear(64, 512)
        self.linear_3, self.linear_4 = nn.Linear(512, 256), nn.Linear(256, 1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        x = self._categories(emb)  # [N, 768]
        x = (x - self.norm.mean) / self.norm.variance.sqrt().clamp(min=1e-7)  # [N, 768], Keras' epsilon
        x = torch.relu(self.linear_1(x))  # [N, 64]
        x = torch.relu(self.linear_2(x))  # [N, 512]
        x = torch.relu(self.linear_3(x))  # [N, 256]
        return torch.sigmoid(self.linear_4(x)).reshape(-1)  # [N]

    def _categories(self, emb: torch.Tensor) -> torch.Tensor:
        """The category columns replaced by their vocabulary index, 0 where the value is not in it."""
        if not len(self.lookup.columns):
            return emb
        x, bounds = emb.clone(), self.lookup.offsets.tolist()
        # '%f' rounds the exact value half-to-even to 6 decimals; so does round() on value * 1e6 in float64
        micro = torch.round(emb[:, self.lookup.columns].T.double() * 1e6).long().contiguous()  # [C, N]
        for i, col in enumerate(self.lookup.columns.tolist()):
            keys, index = self.lookup.keys[bounds[i] : bounds[i + 1]], self.lookup.index[bounds[i] : bounds[i + 1]]
            pos = torch.searchsorted(keys, micro[i]).clamp(max=len(keys) - 1)  # [N]
            x[:, col] = torch.where(keys[pos] == micro[i], index[pos], 0.0)
        return x


def load_nsfw_head(path: str) -> NsfwHead:
    """The head from its weights file; the `lookup.*` tensors are optional (LAION's own `.pth` has none)."""
    state = _state_dict(path, "models.nsfw_head")
    head = NsfwHead(n_lookup=len(state.get("lookup.columns", ())), lookup_size=len(state.get("lookup.keys", ())))
    try:
        optional = {k: v for k, v in head.state_dict().items() if k.startswith("lookup.")}
        head.load_state_dict({**optional, **state})
    except RuntimeError as e:
        raise SigmaError(
            f"models.nsfw_head: {path}: not LAION's ViT-L/14 NSFW head ({str(e).splitlines()[-1].strip()})"
        ) from None
    return head


def watermark_model() -> nn.Module:
    """LAION's watermark detector architecture (random weights until a state dict is loaded)."""
    import timm

    # timm renamed `efficientnet_b3a` (LAION's name) to `efficientnet_b3`: same layers, same keys
    model = timm.create_model("efficientnet_b3", pretrained=False, num_classes=2)
    model.classifier = nn.Sequential(
        nn.Linear(1536, 625), nn.ReLU(), nn.Dropout(0.3), nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2)
    )
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
            self.nsfw = load_nsfw_head(nsfw_head).to(self.device).eval().requires_grad_(False)
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
