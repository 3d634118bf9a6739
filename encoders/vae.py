"""The VAE: loading (path or hub id), bucket preprocessing, latent distributions, a tiny offline model.

PixArt-Sigma uses the SDXL VAE (4 latent channels, x8 downsampling, scaling factor 0.13025). It
stores the latent *distribution* (mean and std) per image, so training can draw a fresh sample
every step. The SDXL VAE overflows in fp16 (unless it is the "fp16-fix" variant): run it in fp32
or bf16, and treat any NaN/Inf in its output as a failed sample.

Preprocessing follows PixArt's multi-scale dataset: resize so the image covers its bucket keeping
the aspect ratio (bicubic; Lanczos for 2K+ buckets), center-crop to the bucket, scale to [-1, 1].
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from encoders import hub
from encoders.dtypes import torch_dtype

LANCZOS_FROM = 2048  # bucket side (max of h, w) from which resizing uses Lanczos, as PixArt's 2K/4K data


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_vae(
    path: str,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    tiling: bool = False,
    slicing: bool = False,
    key: str = "models.vae",
):
    """diffusers `AutoencoderKL` in eval mode, no grad.

    `tiling` encodes large images in overlapping tiles (bounded memory for 2K/4K on small GPUs;
    tiles are blended, but latents can differ slightly from a whole-image encode near tile seams).
    `slicing` encodes a batch one image at a time (bounded memory, same result).
    """
    from diffusers import AutoencoderKL

    where = hub.require(str(path), key, what="VAE")  # a bucket URL: its local copy
    dtype = torch_dtype(dtype)
    # diffusers' default low_cpu_mem_usage=True needs `accelerate` (optional here): without it,
    # diffusers falls back to False and prints a "pip install accelerate" hint on every load
    low_cpu_mem_usage = importlib.util.find_spec("accelerate") is not None
    vae = AutoencoderKL.from_pretrained(where, torch_dtype=dtype, low_cpu_mem_usage=low_cpu_mem_usage)
    vae = vae.to(device).eval().requires_grad_(False)
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    return vae


def read_config(path: str, key: str = "models.vae") -> dict:
    """The VAE's config.json (a local folder or a hub id), read without importing diffusers (~10 s)."""
    folder = Path(hub.require(str(path), key, what="VAE")) if hub.in_bucket(str(path)) else Path(path)
    if not folder.is_dir():
        hub.require(str(path), key, what="VAE")
        from huggingface_hub import hf_hub_download

        folder = Path(hf_hub_download(str(path), "config.json")).parent
    return json.loads((folder / "config.json").read_text())


def latent_format(config: dict) -> tuple[float, int]:
    """(scaling_factor, latent_channels) of a VAE config, with diffusers' defaults for absent keys."""
    return float(config.get("scaling_factor", 0.18215)), int(config.get("latent_channels", 4))


def scaling_factor(vae) -> float:
    return float(vae.config.scaling_factor)


def latent_channels(vae) -> int:
    return int(vae.config.latent_channels)


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def open_image(data: bytes) -> Image.Image:
    """Decode bytes to RGB, applying the EXIF orientation (so width/height are as displayed)."""
    import io

    img = Image.open(io.BytesIO(data))
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def resized_size(height: int, width: int, bucket_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) after the aspect-keeping resize that just covers the bucket (PixArt's rule)."""
    bh, bw = bucket_hw
    if bh / height > bw / width:
        new_h, new_w = bh, int(width * bh / height)
    else:
        new_h, new_w = int(height * bw / width), bw
    return max(new_h, bh), max(new_w, bw)


def resize_and_crop(img: Image.Image, bucket_hw: tuple[int, int]) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Resize to cover the bucket (aspect kept), center-crop to it.

    Returns the cropped image (bucket size) and the crop box (left, top, right, bottom) in the
    coordinates of the resized image, as PixArt/torchvision's Resize + CenterCrop would cut it.
    """
    bh, bw = bucket_hw
    new_h, new_w = resized_size(img.size[1], img.size[0], bucket_hw)
    resample = Image.LANCZOS if max(bh, bw) >= LANCZOS_FROM else Image.BICUBIC
    img = img.resize((new_w, new_h), resample=resample)
    top, left = int(round((new_h - bh) / 2.0)), int(round((new_w - bw) / 2.0))
    box = (left, top, left + bw, top + bh)
    return img.crop(box), box


def to_pixels(images) -> torch.Tensor:
    """RGB image(s) (PIL, [H, W, 3] or [B, H, W, 3] uint8) -> [(B,) 3, H, W] float32 in [-1, 1]
    (ToTensor + Normalize(0.5, 0.5)); encode's VAE stage calls it on a batch."""
    arr = np.asarray(images, dtype=np.float32) / 255.0  # [(B,) H, W, 3]
    return torch.from_numpy(arr).movedim(-1, -3).mul(2.0).sub(1.0).contiguous()  # [(B,) 3, H, W]


def preprocess(img: Image.Image, bucket_hw: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """The whole preprocessing in one call: ([3, bh, bw] pixels in [-1, 1], crop box)."""
    cropped, box = resize_and_crop(img, bucket_hw)
    return to_pixels(cropped), box


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_latent_dist(vae, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent distribution of preprocessed pixels [B, 3, H, W]: (mean, std), each [B, C, H/8, W/8] float32."""
    param = next(vae.parameters())
    dist = vae.encode(pixels.to(param.device, param.dtype)).latent_dist
    return dist.mean.float().cpu(), dist.std.float().cpu()  # [B, C, h, w] each


# ---------------------------------------------------------------------------------------------
# Tiny offline model (demo and tests)
# ---------------------------------------------------------------------------------------------


def build_tiny(out: str | Path, seed: int = 0) -> Path:
    """A tiny `AutoencoderKL` in the SDXL layout (4 blocks: x8 downsampling, 4 latent channels).

    Four blocks matter: a 2-block VAE downsamples only x2 and its mid-block attention then runs over
    ~262k tokens at 1024^2 (minutes per image on a CPU). Random weights, fixed seed, safetensors.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=256,
        scaling_factor=0.13025,
        force_upcast=True,
    ).eval()
    out = Path(out)
    vae.save_pretrained(out, safe_serialization=True)
    return out
