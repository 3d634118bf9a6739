"""Stages of weak-to-strong training: which stage, which data, which weights it starts from.

A stage is a `common.config.Stage` in `training.stages` of pipelines.yaml. `parent` names the stage
whose output it starts from, so `--stage 2k` alone continues from `<training.out>/1k`:

    256 -> vae -> 512 -> 1k -> 2k -> 4k -> kv

Starting weights, first match wins: the stage's own RUNDIR has a checkpoint (resume) > `--init`
(a checkpoint file or a run folder) > the parent's RUNDIR (its newest `model.safetensors`) >
`models.dit_weights` (a root stage) > random initialisation (a root stage).

Loading is strict except for what a stage switch adds: the KV-compression conv + LayerNorm of
newly compressed layers keep their average initialisation, and the null caption is set from the
data. The position embedding is never stored; it is recomputed for the new `pe_interpolation`.
Every problem here is a `SigmaError` whose message is one line.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.config import Config, Stage
from encoders import hub
from shards import loader, storage
from shards.buckets import TIER_TABLES
from shards.errors import SigmaError
from shards.storage import Loc
from training import checkpoint
from training.convert import NULL_CAPTION_KEY

KV_PARAMS = (".attn.sr.", ".attn.norm.")  # what switching on KV compression adds to a block


def resolve(cfg: Config, name: str) -> Stage:
    """The stage called `name`, after checking its parent chain and its own settings."""
    stages = cfg.training.stages
    if name not in stages:
        raise SigmaError(f"--stage {name}: no such stage; choose one of {sorted(stages)}")
    chain(cfg, name)
    st = stages[name]
    where = f"training.stages.{name}"
    if st.tier not in TIER_TABLES:
        raise SigmaError(f"{where}.tier: unknown tier {st.tier!r}; choose one of {list(TIER_TABLES)}")
    if st.kv_compress and not st.kv_compress_layers:
        raise SigmaError(f"{where}.kv_compress_layers: kv_compress is on but no layer is listed")
    if st.kv_compress and st.kv_compress_ratio < 2:
        raise SigmaError(f"{where}.kv_compress_ratio: must be >= 2, got {st.kv_compress_ratio}")
    for key in ("batch_size", "steps", "grad_accum"):
        if getattr(st, key) < 1:
            raise SigmaError(f"{where}.{key}: must be >= 1, got {getattr(st, key)}")
    if not 0.0 <= st.real_prompt_ratio <= 1.0 or not 0.0 <= st.cfg_dropout < 1.0:
        raise SigmaError(f"{where}: real_prompt_ratio must be in [0, 1] and cfg_dropout in [0, 1)")
    caption_rule(st, where)  # weights and temperature checked now; the sets against the data by the loader
    return st


def caption_rule(st: Stage, where: str) -> loader.CaptionRule:
    """The stage's caption choice as the loader's rule (one-line errors name `where`.captions...)."""
    c = st.captions
    return loader.caption_rule(
        c.weights or None, st.real_prompt_ratio, c.clip_score, c.clip_threshold, c.clip_temperature, f"{where}.captions"
    )


def chain(cfg: Config, name: str) -> list[str]:
    """[root, ..., name] following `parent`; unknown parents and cycles are errors."""
    stages, seen = cfg.training.stages, [name]
    while (parent := stages[seen[-1]].parent) is not None:
        if parent not in stages:
            raise SigmaError(f"training.stages.{seen[-1]}.parent: no such stage {parent!r}")
        if parent in seen:
            raise SigmaError(f"training.stages.{name}: parent cycle {' -> '.join(seen + [parent])}")
        seen.append(parent)
    return seen[::-1]


def run_dir(cfg: Config, name: str, out: str | None = None) -> Loc:
    """RUNDIR: --out, else <training.out>/<stage>; a local folder or a bucket URL (s3://...)."""
    return storage.resolve(out, cfg.storage) if out else storage.resolve(cfg.training.out, cfg.storage) / name


def resolution(stage: Stage) -> int:
    """Nominal square side in pixels of the stage's bucket table (256, 512, 1024, 2048, 2880)."""
    return int(TIER_TABLES[stage.tier])


def model_kwargs(stage: Stage, latent_channels: int, caption_channels: int, max_length: int) -> dict:
    """Overrides of the named DiT size for this stage: position setup, KV compression, data widths."""
    return dict(
        input_size=resolution(stage) // 8,
        pe_interpolation=stage.pe_interpolation,
        multi_scale=stage.multi_scale,
        in_channels=latent_channels,
        caption_channels=caption_channels,
        model_max_length=max_length,
        class_dropout_prob=stage.cfg_dropout,
        kv_compress_layers=tuple(stage.kv_compress_layers) if stage.kv_compress else (),
        kv_compress_ratio=stage.kv_compress_ratio,
    )


def init_source(cfg: Config, name: str, init: str | None) -> Path | Loc | None:
    """Where a fresh run of `name` takes its starting weights (None: random init)."""
    if init and hub.in_bucket(init):
        run = storage.resolve(init, cfg.storage)
        if not checkpoint.folder(run).is_dir():
            return Path(bucket_weights(cfg, init, "--init"))  # a weights file or diffusers folder, not a run
        ckpt = checkpoint.latest(run)  # a run folder on the store: read from there
        if ckpt is None:
            raise SigmaError(f"--init {init}: run folder has no complete checkpoint")
        return ckpt / checkpoint.MODEL
    if init:
        path = Path(init)
        if path.is_dir() and checkpoint.folder(path).is_dir():
            ckpt = checkpoint.latest(path)
            if ckpt is None:
                raise SigmaError(f"--init {init}: run folder has no complete checkpoint")
            return ckpt / checkpoint.MODEL
        if not path.exists():
            raise SigmaError(f"--init {init}: no such checkpoint or run folder")
        return path
    parent = cfg.training.stages[name].parent
    if parent is not None:
        parent_dir = run_dir(cfg, parent)
        ckpt = checkpoint.latest(parent_dir.local if parent_dir.is_local else parent_dir)  # a Loc on a store
        if ckpt is None:
            raise SigmaError(
                f"--stage {name}: starts from its parent stage {parent}, but {parent_dir} has no "
                f"checkpoint; run `training/finetune --stage {parent}` first or pass --init"
            )
        return ckpt / checkpoint.MODEL
    if cfg.models.dit_weights and hub.in_bucket(cfg.models.dit_weights):
        return Path(bucket_weights(cfg, cfg.models.dit_weights, "models.dit_weights"))
    if cfg.models.dit_weights:
        if not Path(cfg.models.dit_weights).exists():
            raise SigmaError(
                f"models.dit_weights: file not found: {cfg.models.dit_weights} (a local .pth / .safetensors or "
                "diffusers folder: download it first, see README 'Use real models')"
            )
        return Path(cfg.models.dit_weights)
    return None


def bucket_weights(cfg: Config, ref: str, key: str) -> str:
    """Starting weights given as a bucket URL, copied once into the models cache (encoders/hub.py): a
    weights file, or a diffusers folder (of a pipeline folder only its `transformer/`)."""
    loc = storage.resolve(ref, cfg.storage)
    if (loc / "transformer" / "config.json").has_file():
        loc = loc / "transformer"
    return hub.require(str(loc), key, what="DiT weights")


def read_weights(path: str | Path | Loc) -> dict:
    """A state dict from our safetensors, an official .pth or a diffusers folder (convert.py)."""
    from training import convert

    return convert.load_checkpoint(path)


def load_init(model: torch.nn.Module, state_dict: dict, source: str) -> list[str]:
    """Load starting weights into a freshly built model; returns the KV-compression keys left at their init.

    Allowed to be missing: the KV-compression layers a stage switches on (average init) and the
    null caption (set from the data). Anything else missing, unexpected or of another shape is a
    one-line error; a first-layer mismatch is reported as latent channels.
    """
    own = model.state_dict()
    w = state_dict.get("x_embedder.proj.weight")
    if w is not None and w.shape[1] != own["x_embedder.proj.weight"].shape[1]:
        raise SigmaError(
            f"{source}: weights take {w.shape[1]} latent channels, the data has "
            f"{own['x_embedder.proj.weight'].shape[1]} (latents from another VAE?)"
        )
    for k, v in state_dict.items():
        if k in own and own[k].shape != v.shape and k != NULL_CAPTION_KEY:
            raise SigmaError(
                f"{source}: {k} has shape {list(v.shape)}, the model wants {list(own[k].shape)} "
                f"(another models.dit size or caption width?)"
            )
    state_dict = {k: v for k, v in state_dict.items() if k != NULL_CAPTION_KEY}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected:
        kv = [k for k in unexpected if any(p in k for p in KV_PARAMS)]
        what = "KV-compression weights for layers this stage does not compress" if kv else "keys the model lacks"
        raise SigmaError(f"{source}: has {what}: {unexpected[:3]}")
    bad = [k for k in missing if k != NULL_CAPTION_KEY and not any(p in k for p in KV_PARAMS)]
    if bad:
        raise SigmaError(f"{source}: missing {len(bad)} weights, e.g. {bad[:3]}")
    return sorted(k for k in missing if k != NULL_CAPTION_KEY)
