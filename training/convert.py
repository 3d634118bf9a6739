"""Checkpoint compatibility: our state dict <-> diffusers `PixArtTransformer2DModel`, official `.pth`.

Our parameter names ARE the official PixArt names, so an official checkpoint needs no renaming:

    official `.pth`                          ours                    diffusers
    {'state_dict': ..., 'optimizer', ...}    (unwrapped)             -
    pos_embed (fixed 1 x T x D buffer)       (dropped: recomputed)   (dropped)
    x_embedder.proj                          same                    pos_embed.proj
    t_embedder.mlp.0 / .2                    same                    adaln_single.emb.timestep_embedder.linear_1 / _2
    t_block.1                                same                    adaln_single.linear
    y_embedder.y_proj.fc1 / .fc2             same                    caption_projection.linear_1 / _2
    y_embedder.y_embedding (null caption)    same                    (dropped: diffusers encodes "" with T5)
    blocks.i.scale_shift_table               same                    transformer_blocks.i.scale_shift_table
    blocks.i.attn.qkv (split 3, dim 0)       same                    transformer_blocks.i.attn1.to_q / to_k / to_v
    blocks.i.attn.proj                       same                    transformer_blocks.i.attn1.to_out.0
    blocks.i.attn.sr / .norm (KV compress)   same                    (none: diffusers cannot express it)
    blocks.i.cross_attn.q_linear             same                    transformer_blocks.i.attn2.to_q
    blocks.i.cross_attn.kv_linear (split 2)  same                    transformer_blocks.i.attn2.to_k / to_v
    blocks.i.cross_attn.proj                 same                    transformer_blocks.i.attn2.to_out.0
    blocks.i.mlp.fc1 / .fc2                  same                    transformer_blocks.i.ff.net.0.proj / ff.net.2
    final_layer.linear                       same                    proj_out
    final_layer.scale_shift_table            same                    scale_shift_table

PixArt-α 1024 checkpoints carry micro-condition embedders (`csize_embedder`, `ar_embedder`); Σ has
none, so they are refused. Loading never unpickles arbitrary objects: `.pth` goes through
`torch.load(weights_only=True)`; everything we write is safetensors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from shards import storage
from shards.errors import SigmaError
from shards.storage import Loc

# (our name, diffusers name) for every tensor that maps one to one; {i} is the block index.
_RENAMES = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.scale_shift_table", "scale_shift_table"),
    ("blocks.{i}.scale_shift_table", "transformer_blocks.{i}.scale_shift_table"),
    ("blocks.{i}.attn.proj", "transformer_blocks.{i}.attn1.to_out.0"),
    ("blocks.{i}.cross_attn.q_linear", "transformer_blocks.{i}.attn2.to_q"),
    ("blocks.{i}.cross_attn.proj", "transformer_blocks.{i}.attn2.to_out.0"),
    ("blocks.{i}.mlp.fc1", "transformer_blocks.{i}.ff.net.0.proj"),
    ("blocks.{i}.mlp.fc2", "transformer_blocks.{i}.ff.net.2"),
]
# Fused projections: ours (one tensor) <-> diffusers (chunks along dim 0, in this order).
_SPLITS = [
    (
        "blocks.{i}.attn.qkv",
        ["transformer_blocks.{i}.attn1.to_q", "transformer_blocks.{i}.attn1.to_k", "transformer_blocks.{i}.attn1.to_v"],
    ),
    ("blocks.{i}.cross_attn.kv_linear", ["transformer_blocks.{i}.attn2.to_k", "transformer_blocks.{i}.attn2.to_v"]),
]
NULL_CAPTION_KEY = "y_embedder.y_embedding"


def _depth(keys, prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _pairs(depth: int):
    """Expand the {i} templates: [(ours, diffusers)] and [(ours, [diffusers chunks])]."""
    renames, splits = [], []
    for ours, theirs in _RENAMES:
        for i in range(depth) if "{i}" in ours else [None]:
            renames.append((ours.format(i=i), theirs.format(i=i)))
    for ours, chunks in _SPLITS:
        for i in range(depth):
            splits.append((ours.format(i=i), [c.format(i=i) for c in chunks]))
    return renames, splits


def to_diffusers(state_dict: dict) -> dict:
    """Our (= official) names -> diffusers `PixArtTransformer2DModel` names. Refuses KV compression."""
    compressed = sorted({int(k.split(".")[1]) for k in state_dict if re.match(r"blocks\.\d+\.attn\.(sr|norm)\.", k)})
    if compressed:
        raise SigmaError(
            f"blocks {compressed} use KV compression (attn.sr/attn.norm), which diffusers' "
            "PixArtTransformer2DModel cannot express; sample it with training/sample, or export "
            "the run of the stage before KV compression (e.g. runs/4k)"
        )
    sd = {k: v for k, v in state_dict.items() if k not in (NULL_CAPTION_KEY, "pos_embed")}
    renames, splits = _pairs(_depth(sd, "blocks."))
    out = _move(sd, renames)
    for ours, chunks in splits:
        for suffix in (".weight", ".bias"):
            parts = sd.pop(ours + suffix).chunk(len(chunks), dim=0)
            out.update({c + suffix: p.contiguous() for c, p in zip(chunks, parts)})
    if sd:
        raise SigmaError(f"no diffusers name for {sorted(sd)[:5]}")
    return out


def _move(sd: dict, renames: list[tuple[str, str]]) -> dict:
    """Pop every `src` module's weight and bias (or the bare `scale_shift_table`) out of `sd`, under `dst`."""
    out = {}
    for src, dst in renames:
        for suffix in (".weight", ".bias", ""):
            if src + suffix in sd and (suffix or src.endswith("scale_shift_table")):
                out[dst + suffix] = sd.pop(src + suffix)
    return out


def from_diffusers(state_dict: dict) -> dict:
    """diffusers names -> ours. The result has no null caption: set it with `set_null_caption`."""
    sd = dict(state_dict)
    extra = [
        k
        for k in sd
        if k.startswith("adaln_single.emb.resolution_embedder")
        or k.startswith("adaln_single.emb.aspect_ratio_embedder")
    ]
    if extra:
        raise SigmaError(f"{extra[0]}: micro-conditions (use_additional_conditions) are PixArt-α only")
    renames, splits = _pairs(_depth(sd, "transformer_blocks."))
    out = _move(sd, [(theirs, ours) for ours, theirs in renames])
    for ours, chunks in splits:
        for suffix in (".weight", ".bias"):
            out[ours + suffix] = torch.cat([sd.pop(c + suffix) for c in chunks], dim=0)
    if sd:
        raise SigmaError(f"unexpected diffusers keys {sorted(sd)[:5]}")
    return out


def from_official(state_dict: dict) -> dict:
    """An official PixArt-Σ `.pth` (whole file or its 'state_dict') -> ours: unwrap, drop `pos_embed`."""
    sd = state_dict.get("state_dict", state_dict)
    micro = [k for k in sd if k.startswith(("csize_embedder.", "ar_embedder."))]
    if micro:
        raise SigmaError(f"{micro[0]}: micro-conditions belong to PixArt-α 1024, not PixArt-Σ")
    return {k: v for k, v in sd.items() if k != "pos_embed"}


def load_into(model: torch.nn.Module, state_dict: dict) -> None:
    """Strict load that tolerates only a missing null caption (diffusers has none)."""
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != NULL_CAPTION_KEY]
    if missing or unexpected:
        raise SigmaError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


# ---------------------------------------------------------------------------------------------
# Reading checkpoints of any of the three kinds
# ---------------------------------------------------------------------------------------------


def load_checkpoint(path: str | Path | Loc) -> dict:
    """Our state dict from: our `.safetensors`, a diffusers transformer/pipeline folder or weights
    file, or an official `.pth` (read with weights_only=True, never a full unpickle)."""
    from training.checkpoint import load_weights

    if isinstance(path, Loc) or "://" in str(path):
        loc = path if isinstance(path, Loc) else storage.resolve(path)
        if not loc.is_local:  # a run's checkpoint on a store (a model folder there: the model cache's)
            if loc.suffix != ".safetensors":
                raise SigmaError(f"{loc}: only a .safetensors checkpoint is read from a store")
            sd = load_weights(loc)
            return from_diffusers(sd) if "adaln_single.linear.weight" in sd else sd
        path = loc.path
    path = Path(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        files = sorted(folder.glob("diffusion_pytorch_model*.safetensors"))
        if not files:
            raise SigmaError(f"{path}: no diffusion_pytorch_model*.safetensors (a diffusers transformer folder)")
        sd = {}
        for f in files:
            sd.update(load_weights(f))
        return from_diffusers(sd)
    if not path.exists():
        raise SigmaError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        sd = load_weights(path)
        return from_diffusers(sd) if "adaln_single.linear.weight" in sd else sd
    if path.suffix in (".pth", ".pt", ".bin"):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle with arbitrary objects: refuse rather than execute it
            raise SigmaError(f"{path}: not loadable with weights_only=True ({type(e).__name__})") from None
        return from_official(sd)
    raise SigmaError(f"{path}: unknown checkpoint format (want .safetensors, .pth or a diffusers folder)")


def infer_arch(state_dict: dict) -> dict:
    """Model kwargs readable from the weights alone (not num_heads, not the position setup)."""
    w = state_dict["x_embedder.proj.weight"]  # [D, C_in, p, p]
    depth = _depth(state_dict, "blocks.")
    kv_layers = [i for i in range(depth) if f"blocks.{i}.attn.sr.weight" in state_dict]
    arch = dict(
        hidden_size=w.shape[0],
        in_channels=w.shape[1],
        patch_size=w.shape[2],
        depth=depth,
        caption_channels=state_dict["y_embedder.y_proj.fc1.weight"].shape[1],
        learn_sigma=state_dict["final_layer.linear.weight"].shape[0] == 2 * w.shape[1] * w.shape[2] ** 2,
        mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / w.shape[0],
        kv_compress_layers=kv_layers,
    )
    if kv_layers:
        arch["kv_compress_ratio"] = state_dict[f"blocks.{kv_layers[0]}.attn.sr.weight"].shape[-1]
    if NULL_CAPTION_KEY in state_dict:
        arch["model_max_length"] = state_dict[NULL_CAPTION_KEY].shape[0]
    return arch


PIPELINE_SAMPLE_SIZES = (256, 128, 64, 32)  # the latent sizes PixArtSigmaPipeline has resolution bins for


def pipeline_sample_size(input_size: int) -> int:
    """The `sample_size` to record: the largest the pipeline's resolution binning accepts that is not
    above the model's latent size (the 4K stage's 360 -> 256, with its interpolation scale adjusted
    so the positions stay identical); a model smaller than every bin keeps its own."""
    return next((s for s in PIPELINE_SAMPLE_SIZES if s <= input_size), input_size)


def diffusers_config(model, sample_size: int | None = None) -> dict:
    """The `PixArtTransformer2DModel` config for `model`, with the two keys whose defaults are wrong
    for Σ always written: `use_additional_conditions` (diffusers turns it on when sample_size is
    128) and `interpolation_scale` (diffusers derives sample_size // 64: 1 at 256 px, not 0.5).

    diffusers takes base_size = sample_size // patch_size, so the scale is chosen to keep
    base_size / interpolation_scale (the span of the position grid) equal to ours. `sample_size`
    defaults to `pipeline_sample_size`.
    """
    sample_size = sample_size or pipeline_sample_size(model.input_size)
    scale = model.pe_interpolation * (sample_size // model.patch_size) / model.base_size
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": model.num_heads,
        "attention_head_dim": model.hidden_size // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": model.depth,
        "cross_attention_dim": model.hidden_size,
        "caption_channels": model.y_embedding.shape[1],
        "sample_size": sample_size,
        "patch_size": model.patch_size,
        "interpolation_scale": scale,
        "use_additional_conditions": False,
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "num_embeds_ada_norm": 1000,
        "dropout": 0.0,
        "upcast_attention": False,
        "attention_type": "default",
    }


def save_diffusers(model, out_dir: str | Path, sample_size: int | None = None) -> Path:
    """Write a diffusers transformer folder: `config.json` + `diffusion_pytorch_model.safetensors`.

    Refuses a KV-compressed model (SigmaError) before writing anything.
    """
    import diffusers
    from safetensors.torch import save_file

    from shards.atomic import atomic_path, write_text

    weights = to_diffusers({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "diffusion_pytorch_model.safetensors") as tmp:
        save_file(weights, str(tmp), metadata={"format": "pt"})
    config = diffusers_config(model, sample_size)
    config["_diffusers_version"] = diffusers.__version__
    write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    return out_dir
