"""The two attentions of a PixArt-Σ block, both through `F.scaled_dot_product_attention`.

Parameter names follow the official PixArt code (`qkv`, `proj`, `sr`, `norm`, `q_linear`,
`kv_linear`), so official checkpoints load without renaming; `training/convert.py` maps them to
diffusers' `attn1` / `attn2`.

Mixed precision: the official code upcasts attention to fp32 (`fp32_attention`) to avoid NaN
losses in fp16. SDPA's fused kernels already accumulate the softmax in fp32, and we train in bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens, with optional key/value token compression.

    With `kv_compress_ratio` r > 1 (PixArt-Σ, high resolution), keys and values are reshaped to
    the token grid and downsampled by a depthwise conv (kernel = stride = r) followed by
    LayerNorm: r² fewer keys/values, queries stay full resolution. The conv starts as an average
    (weights 1/r², bias 0), so weights trained without compression keep working when it is
    switched on; the LayerNorm renormalises the averaged tokens (smooth, not identical, start).
    """

    def __init__(self, dim: int, num_heads: int, kv_compress_ratio: int = 1):
        super().__init__()
        self.num_heads = num_heads
        self.kv_compress_ratio = kv_compress_ratio
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        if kv_compress_ratio > 1:
            r = kv_compress_ratio
            self.sr = nn.Conv2d(dim, dim, kernel_size=r, stride=r, groups=dim)
            self.norm = nn.LayerNorm(dim)  # eps 1e-5, affine, as the official code
            self.reset_compression()

    def reset_compression(self) -> None:
        """Average initialisation of the compression conv (weights 1/r², bias 0)."""
        nn.init.constant_(self.sr.weight, 1.0 / self.kv_compress_ratio**2)
        nn.init.zeros_(self.sr.bias)

    def compress(self, t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = t.shape
        h, w = hw
        t = t.transpose(1, 2).reshape(B, C, h, w)  # [B, C, h, w]
        t = self.sr(t).flatten(2).transpose(1, 2)  # [B, (h//r)*(w//r), C]
        return self.norm(t)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        H, D = self.num_heads, C // self.num_heads
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)  # 3 x [B, N, C]
        if self.kv_compress_ratio > 1:
            k, v = self.compress(k, hw), self.compress(v, hw)  # [B, M, C], M = N / r²
        q = q.reshape(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        k = k.reshape(B, -1, H, D).transpose(1, 2)  # [B, H, M, D]
        v = v.reshape(B, -1, H, D).transpose(1, 2)  # [B, H, M, D]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to projected caption tokens; padded tokens are never attended.

    `mask` is [B, L] bool, True = valid token. A caption with no valid token at all (which T5
    never produces: it always emits EOS) attends to every token, as diffusers' additive -10000
    bias does, instead of producing NaN.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, C = x.shape
        L = y.shape[1]
        H, D = self.num_heads, C // self.num_heads
        q = self.q_linear(x).reshape(B, N, H, D).transpose(1, 2)  # [B, H, N, D]
        k, v = self.kv_linear(y).reshape(B, L, 2, H, D).unbind(2)  # 2 x [B, L, H, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, H, L, D]
        attn_mask = None
        if mask is not None:
            mask = mask.bool() | ~mask.bool().any(dim=1, keepdim=True)  # [B, L]
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, H, N, D]
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # [B, N, C]
