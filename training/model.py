"""The PixArt-Σ Diffusion Transformer, top to bottom.

latents [N, 4, H, W] --patchify--> tokens + 2-D sin-cos position --28 blocks--> T2I final layer
--unpatchify--> [N, 8, H, W] (epsilon and the learned-variance interpolation, 4 channels each).

Each block: adaLN-single modulated self-attention (optionally KV-compressed), cross-attention to
projected T5 tokens (padded tokens masked), modulated GELU-tanh MLP. One `t_block` (SiLU + Linear
hidden -> 6*hidden) is shared by all blocks; each block adds its own learned 6 x hidden
`scale_shift_table`. No micro-conditions (PixArt-Σ dropped them).

Parameter and buffer names are the official PixArt ones (`x_embedder`, `t_block`, `blocks.i.attn.qkv`,
...), so an official `.pth` loads after dropping its fixed `pos_embed`; `training/convert.py` maps
to and from diffusers' `PixArtTransformer2DModel`. XL/2: 610.9M parameters (21.26M per block).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from training.attention import CrossAttention, SelfAttention

#################################################################################
#                      Embeddings: position, timestep, caption                  #
#################################################################################


def sincos_pos_embed(dim: int, h: int, w: int, base_size: float, pe_interpolation: float, device=None) -> torch.Tensor:
    """2-D sin-cos position embedding [h*w, dim] for an h x w token grid.

    Grid coordinates are divided by (grid / base_size) and by pe_interpolation, so every size and
    aspect ratio spans the same range: [0, base_size / pe_interpolation) per axis, which is
    [0, 32) for every official stage (base_size = resolution/16, pe_interpolation = resolution/512).
    First half of the channels encodes the column (width), second half the row; each [sin, cos].
    Computed in float64 like diffusers, returned as float32.
    """
    rows = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / pe_interpolation  # [h]
    cols = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / pe_interpolation  # [w]
    grid_r, grid_c = torch.meshgrid(rows, cols, indexing="ij")  # [h, w] each
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000**omega  # [dim/4]

    def embed(pos):  # [h, w] -> [h*w, dim/2]
        out = torch.outer(pos.reshape(-1).double(), omega)  # [h*w, dim/4]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed(grid_c), embed(grid_r)], dim=1).float()  # [h*w, dim]


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of the latent -> hidden-size tokens, row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [N, h*w, D]


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> 256 sinusoidal frequencies ([cos, sin], GLIDE) -> MLP -> hidden."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)  # [128]
        args = t[:, None].float() * freqs[None]  # [N, 128]
        t_freq = torch.cat([args.cos(), args.sin()], dim=-1)  # [N, 256]
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # [N, D]


class Mlp(nn.Module):
    """Linear -> GELU(tanh) -> Linear (timm's Mlp, the official key names fc1/fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Projects T5 features to hidden size; replaces whole captions by the null caption for CFG.

    `y_embedding` [L, C] is a buffer, not trained: set it to the T5 encoding of the empty string
    padded to L (`PixArtSigma.set_null_caption`), as the official loader does. No token position
    embedding, so the token count (120 in α, 300 in Σ) needs no weight change.
    """

    def __init__(self, caption_channels: int, hidden_size: int, model_max_length: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(model_max_length, caption_channels) / caption_channels**0.5)

    def forward(self, y: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is not None or (train and self.dropout_prob > 0):
            if y.shape[1:] != self.y_embedding.shape:
                raise ValueError(
                    f"caption dropout needs captions padded to {tuple(self.y_embedding.shape)} "
                    f"(model_max_length x caption_channels), got {tuple(y.shape[1:])}"
                )
            if force_drop_ids is None:
                drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob  # [N]
            else:
                drop = force_drop_ids.to(y.device) == 1  # [N]
            y = torch.where(drop[:, None, None], self.y_embedding.to(y.dtype), y)  # [N, L, C]
        return self.y_proj(y)  # [N, L, D]


#################################################################################
#                                 Core blocks                                   #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class PixArtBlock(nn.Module):
    """adaLN-single block: modulated self-attn, (unmodulated) cross-attn, modulated MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, kv_compress_ratio: int = 1):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, kv_compress_ratio)
        self.cross_attn = CrossAttention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), hidden_size)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x, y, t0, mask, hw):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(B, 6, -1)
        ).chunk(6, dim=1)  # 6 x [B, 1, D]
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), hw)  # [B, N, D]
        x = x + self.cross_attn(x, y, mask)  # [B, N, D]
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # [B, N, D]
        return x


class FinalLayer(nn.Module):
    """LayerNorm (no affine) modulated by its own 2 x hidden table plus the timestep embedding."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # 2 x [N, 1, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [N, T, p*p*C_out]


#################################################################################
#                                 The model                                     #
#################################################################################


class PixArtSigma(nn.Module):
    """PixArt-Σ DiT. forward(x [N,4,H,W], t [N], y [N,L,C], mask [N,L] bool) -> [N,8,H,W].

    `input_size` is the latent side of the training resolution (1024 px -> 128). With
    `multi_scale` the position embedding is recomputed for every input grid (any bucket);
    without it (the 256 stage) the model has one fixed square embedding and accepts only
    input_size x input_size. `kv_compress_layers` lists the blocks whose keys/values are
    compressed by `kv_compress_ratio`.
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int = 2,
        in_channels: int = 4,
        *,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        model_max_length: int = 300,
        pe_interpolation: float = 1.0,
        base_size: int | None = None,
        multi_scale: bool = True,
        kv_compress_layers=(),
        kv_compress_ratio: int = 2,
        learn_sigma: bool = True,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        bad = [i for i in kv_compress_layers if not 0 <= i < depth]
        if bad:
            raise ValueError(f"kv_compress_layers {bad} out of range for depth {depth}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.depth, self.num_heads = hidden_size, depth, num_heads
        self.pe_interpolation = float(pe_interpolation)
        self.base_size = base_size or input_size // patch_size
        self.multi_scale = multi_scale
        self.kv_compress_layers = tuple(sorted(kv_compress_layers))
        self.kv_compress_ratio = kv_compress_ratio
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, model_max_length, class_dropout_prob)
        self.blocks = nn.ModuleList(
            [
                PixArtBlock(hidden_size, num_heads, mlp_ratio, kv_compress_ratio if i in self.kv_compress_layers else 1)
                for i in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if not multi_scale:
            grid = input_size // patch_size
            self.register_buffer(
                "pos_embed",
                sincos_pos_embed(hidden_size, grid, grid, self.base_size, self.pe_interpolation)[None],
                persistent=False,
            )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation: xavier Linears, N(0, 0.02) embedders, zero output layers."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for lin in (
            self.t_embedder.mlp[0],
            self.t_embedder.mlp[2],
            self.t_block[1],
            self.y_embedder.y_proj.fc1,
            self.y_embedder.y_proj.fc2,
        ):
            nn.init.normal_(lin.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @property
    def y_embedding(self) -> torch.Tensor:
        return self.y_embedder.y_embedding

    @torch.no_grad()
    def set_null_caption(self, y_embedding: torch.Tensor) -> None:
        """Set the CFG null caption: T5("") padded to model_max_length, [L, C]."""
        if y_embedding.shape != self.y_embedding.shape:
            raise ValueError(f"null caption must be {tuple(self.y_embedding.shape)}, got {tuple(y_embedding.shape)}")
        self.y_embedder.y_embedding.copy_(y_embedding)

    def pos_embed_for(self, h: int, w: int, device) -> torch.Tensor:
        if not self.multi_scale:
            grid = self.input_size // self.patch_size
            if (h, w) != (grid, grid):
                raise ValueError(
                    f"single-scale model takes only a {grid}x{grid} token grid "
                    f"({self.input_size}x{self.input_size} latents), got {h}x{w}"
                )
            return self.pos_embed
        return sincos_pos_embed(self.hidden_size, h, w, self.base_size, self.pe_interpolation, device)[None]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None = None,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        N, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not divisible by the patch size {p}")
        h, w = H // p, W // p
        x = self.x_embedder(x) + self.pos_embed_for(h, w, x.device).to(x.dtype)  # [N, h*w, D]
        t_emb = self.t_embedder(t)  # [N, D]
        t0 = self.t_block(t_emb)  # [N, 6D]
        y = self.y_embedder(y, self.training, force_drop_ids)  # [N, L, D]
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, y, t0, mask, (h, w), use_reentrant=False)  # [N, h*w, D]
            else:
                x = block(x, y, t0, mask, (h, w))  # [N, h*w, D]
        x = self.final_layer(x, t_emb)  # [N, h*w, p*p*C_out]
        x = x.reshape(N, h, w, p, p, self.out_channels)  # [N, h, w, p, p, C_out]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [N, C_out, h, p, w, p]
        return x.reshape(N, self.out_channels, h * p, w * p)  # [N, C_out, H, W]


#################################################################################
#                                 Named sizes                                   #
#################################################################################
# Defaults are the released PixArt-Sigma-XL-2-1024-MS setup (1024 px: latent 128,
# pe_interpolation 2.0); every keyword can be overridden, e.g. DiT_models["XL/2"](input_size=64,
# pe_interpolation=1.0) for the 512 stage.


RELEASED_1024 = dict(input_size=128, pe_interpolation=2.0)  # PixArt-Sigma-XL-2-1024-MS


def PixArt_tiny(**kw):  # CPU tests and the demo; caption_channels 32 = the tiny T5's d_model
    return PixArtSigma(**{**RELEASED_1024, "hidden_size": 64, "depth": 4, "num_heads": 4, "caption_channels": 32, **kw})


def PixArt_S_2(**kw):
    return PixArtSigma(**{**RELEASED_1024, "hidden_size": 384, "depth": 12, "num_heads": 6, **kw})


def PixArt_B_2(**kw):
    return PixArtSigma(**{**RELEASED_1024, "hidden_size": 768, "depth": 12, "num_heads": 12, **kw})


def PixArt_XL_2(**kw):  # 610.9M parameters
    return PixArtSigma(**{**RELEASED_1024, "hidden_size": 1152, "depth": 28, "num_heads": 16, **kw})


DiT_models = {"tiny": PixArt_tiny, "S/2": PixArt_S_2, "B/2": PixArt_B_2, "XL/2": PixArt_XL_2}
