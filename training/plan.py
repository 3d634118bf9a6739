"""What `training/finetune` resolves before training: the stage, its data, RUNDIR, the starting
weights and the model (the `Plan` that --dry-run prints and RUNDIR/run.json records), and the
run's fingerprint, compared on every resume.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from encoders import vae as vae_mod
from shards import encoded, fingerprint, loader
from shards.errors import SigmaError
from training import checkpoint, runs, stages
from training.model import DiT_models

UNFINGERPRINTED = ("steps", "data", "parent")  # stage keys a resume may change: more steps, a moved ENCDIR


@dataclass
class Plan:
    """One stage's run, resolved: `prepare` makes it, `train` follows it, run.json records it."""

    stage: str
    chain: list
    data: str
    rundir: str
    resume: str | None
    init: str | None
    init_trained_at: str | None  # the starting weights' position setup, where known
    resolution: int  # the stage's nominal square side in pixels
    steps: int
    world_size: int
    global_batch: int
    model: dict  # size + the stage's model settings: what sample/export/evaluate rebuild
    vae: str
    encoders: dict  # T5 + tokenizer, VAE, null caption of the data (runs.encoders_record): what sample/export use
    settings: dict


def prepare(cfg, args) -> Plan:
    """Stage, data, RUNDIR and starting point of this run; SigmaError on any mismatch."""
    name = args.stage
    stage = stages.resolve(cfg, name)
    encdir = args.data or stage.data
    if not encdir:
        raise SigmaError(f"--stage {name}: no data; pass --data ENCDIR or set training.stages.{name}.data")
    info = encoded.read_info(encdir)
    if info["tier"] != stage.tier:
        raise SigmaError(f"--data {encdir}: encoded at tier {info['tier']}, stage {name} trains on tier {stage.tier}")
    vae_path = stage.vae or cfg.models.vae
    scaling, channels = vae_mod.latent_format(vae_mod.read_config(vae_path))
    loader.check_vae(encdir, scaling, channels)
    side = stages.resolution(stage)
    if not stage.multi_scale and f"{side}x{side}" not in encoded.shards_by_bucket(encdir):
        raise SigmaError(f"--data {encdir}: stage {name} is single-scale (multi_scale: false) and needs the "
                         f"{side}x{side} bucket, which holds no sample")
    kw = stages.model_kwargs(stage, info["latent_channels"], info["t5_dim"], info["max_length"])
    if cfg.models.dit not in DiT_models:
        raise SigmaError(f"models.dit: unknown size {cfg.models.dit!r}; choose one of {list(DiT_models)}")
    with torch.device("meta"):  # checks the stage's model settings (e.g. KV layers beyond the depth) for free
        DiT_models[cfg.models.dit](**kw)
    rundir = stages.run_dir(cfg, name, args.out)
    resume = checkpoint.latest(rundir)
    init = None if resume else stages.init_source(cfg, name, args.init)
    trained_at = runs.known_position(init, cfg.training.stages) if init else None
    world = int(os.environ.get("WORLD_SIZE", 1))
    return Plan(stage=name, chain=stages.chain(cfg, name), data=str(encdir), rundir=str(rundir),
                resume=str(resume) if resume else None, init=str(init) if init else None,
                init_trained_at=runs.position_text(trained_at) if trained_at else None, resolution=side,
                steps=args.max_steps or stage.steps, world_size=world,
                global_batch=stage.batch_size * stage.grad_accum * world, model=dict(size=cfg.models.dit, **kw),
                vae=vae_path, encoders=runs.encoders_record(encdir, cfg.models.t5, vae_path),
                settings=dict(stage.__dict__))


def position_warning(plan: Plan, explicit_init: bool, stages: dict) -> str | None:
    """A note when weights given by --init / models.dit_weights were trained at another position setup
    (moving up from the parent stage changes it by design), naming the stage that trains at theirs."""
    want = runs.position_text({k: plan.model[k] for k in runs.POSITION_KEYS})
    if explicit_init and plan.init_trained_at and plan.init_trained_at != want:
        theirs = runs.known_position(plan.init, stages)
        match = runs.stage_for(stages, theirs) if theirs else None
        advice = f"use the stage that matches: --stage {match}" if match else "no stage in training.stages matches"
        return (f"warning: {plan.init} was trained at {plan.init_trained_at}; stage {plan.stage} trains at "
                f"{want} (the positions are re-learned; {advice})")
    return None


def run_fingerprint(cfg, plan: Plan) -> dict:
    """What a resume must share with the run so far: the data files and every setting that changes the weights."""
    data = Path(plan.data)
    files = [p for p in data.rglob("*") if p.is_file()]
    where = f"training.stages.{plan.stage}"
    return {"data": fingerprint.listing(files), "model": plan.model, "vae": plan.vae,
            "training.num_workers": cfg.training.num_workers,
            **{f"{where}.{k}": v for k, v in plan.settings.items() if k not in UNFINGERPRINTED}}


