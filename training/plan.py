"""What `training/finetune` resolves before training: the stage, its data, RUNDIR, the starting
weights and the model (the `Plan` that --dry-run prints and RUNDIR/run.json records), and the
run's fingerprint, compared on every resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import torch

from common.config import CaptionChoice, Stage
from encoders import vae as vae_mod
from shards import encoded, fingerprint, loader, storage
from shards.errors import SigmaError
from shards.storage import Loc
from training import checkpoint, runs, stages
from training.model import DiT_models


@dataclass
class Plan:
    """One stage's run, resolved: `prepare` makes it, `train` follows it, run.json records it."""

    stage: str
    chain: list
    data: Loc | None  # ENCDIR: a local folder or a bucket URL (read through the cache, shards/cache.py)
    rundir: Loc  # a local folder or a bucket URL (training/runfolder.py)
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

    def record(self) -> dict:
        """The plan as plain JSON-able values (run.json, --dry-run): places as their paths or URLs."""
        return {f.name: str(v) if isinstance(v := getattr(self, f.name), Loc) else v for f in fields(self)}


def check_models(cfg, plan: Plan) -> None:
    """The T5 and VAE the sample grids generate with (the data's, as run.json records them), checked
    before any data or model loads: an unreachable hub is one line now, not a traceback at the first grid."""
    if not (cfg.training.sample_every and cfg.training.sample_prompts and plan.encoders):
        return
    from encoders import hub

    for name, key, what in (("t5", "models.t5", "T5 encoder"), ("vae", "models.vae", "VAE")):
        entry = plan.encoders[name]
        hub.require(entry["path"], key, entry.get("revision"), what=what)


def prepare(cfg, args, not_checked: list[str] | None = None) -> Plan:
    """Stage, data, RUNDIR and starting point of this run; SigmaError on any mismatch. With `not_checked`
    (a dry run), what cannot be checked yet (data not encoded, parent run not trained) is appended
    there instead of raised, and the plan is made from the config alone."""
    name = args.stage
    stage = stages.resolve(cfg, name)
    given = args.data or stage.data
    encdir = storage.resolve(given, cfg.storage) if given else None

    def unchecked(e: SigmaError) -> None:
        if not_checked is None:
            raise e
        not_checked.append(str(e))

    if not encdir:
        unchecked(SigmaError(f"--stage {name}: no data; pass --data ENCDIR or set training.stages.{name}.data"))
    vae_path = stage.vae or cfg.models.vae
    side = stages.resolution(stage)
    info = None
    try:
        if encdir:
            storage.probe(encdir)  # a missing bucket or an unreachable store: one line naming the URL
            info = encoded.read_info(encdir)
    except SigmaError as e:
        unchecked(e)
    if info is not None:
        if info["tier"] != stage.tier:
            raise SigmaError(
                f"--data {encdir}: encoded at tier {info['tier']}, stage {name} trains on tier {stage.tier}"
            )
        scaling, channels = vae_mod.latent_format(vae_mod.read_config(vae_path))
        loader.check_vae(encdir, scaling, channels)
        if not stage.multi_scale and f"{side}x{side}" not in encoded.shards_by_bucket(encdir):
            raise SigmaError(
                f"--data {encdir}: stage {name} is single-scale (multi_scale: false) and needs the "
                f"{side}x{side} bucket, which holds no sample"
            )
        kw = stages.model_kwargs(stage, info["latent_channels"], info["t5_dim"], info["max_length"])
    else:  # widths come from the data: the model is not built, only its stage settings shown
        kw = stages.model_kwargs(stage, None, None, cfg.encode.t5_max_length)
        if not_checked is not None:
            not_checked.append("model: latent channels, caption width and the VAE match come from the encoded data")
    if cfg.models.dit not in DiT_models:
        raise SigmaError(f"models.dit: unknown size {cfg.models.dit!r}; choose one of {list(DiT_models)}")
    if info is not None:
        with torch.device("meta"):  # checks the stage's model settings (e.g. KV layers beyond the depth) for free
            DiT_models[cfg.models.dit](**kw)
    rundir = stages.run_dir(cfg, name, args.out)
    resume = checkpoint.latest(rundir)
    init = None
    try:
        init = None if resume else stages.init_source(cfg, name, args.init)
    except SigmaError as e:
        unchecked(e)
    trained_at = runs.known_position(init, cfg.training.stages) if init else None
    world = int(os.environ.get("WORLD_SIZE", 1))
    return Plan(
        stage=name,
        chain=stages.chain(cfg, name),
        data=encdir,
        rundir=rundir,
        resume=str(resume) if resume else None,
        init=str(init) if init else None,
        init_trained_at=runs.position_text(trained_at) if trained_at else None,
        resolution=side,
        steps=args.max_steps or stage.steps,
        world_size=world,
        global_batch=stage.batch_size * stage.grad_accum * world,
        model=dict(size=cfg.models.dit, **kw),
        vae=vae_path,
        encoders=runs.encoders_record(encdir, cfg.models.t5, vae_path) if info is not None else {},
        settings=dict(stage.__dict__),
    )


def position_warning(plan: Plan, explicit_init: bool, stages: dict) -> str | None:
    """A note when weights given by --init / models.dit_weights were trained at another position setup
    (moving up from the parent stage changes it by design), naming the stage that trains at theirs."""
    want = runs.position_text({k: plan.model[k] for k in runs.POSITION_KEYS})
    if explicit_init and plan.init_trained_at and plan.init_trained_at != want:
        theirs = runs.known_position(plan.init, stages)
        match = runs.stage_for(stages, theirs) if theirs else None
        advice = f"use the stage that matches: --stage {match}" if match else "no stage in training.stages matches"
        return (
            f"warning: {plan.init} was trained at {plan.init_trained_at}; stage {plan.stage} trains at "
            f"{want} (the positions are re-learned; {advice})"
        )
    return None


def run_fingerprint(cfg, plan: Plan) -> dict:
    """What a resume must share with the run so far: the data files and every setting that changes the weights."""
    assert plan.data is not None
    files = [p for p in plan.data.files() if p.name != fingerprint.LOCK]  # the lock is encode's, not data
    where = f"training.stages.{plan.stage}"
    stage = Stage(**plan.settings)
    settings = fingerprint.flat(stage, where)
    if stage.captions == CaptionChoice():  # the default choice: runs started before caption sets still resume
        settings = {k: v for k, v in settings.items() if not k.startswith(f"{where}.captions.")}
    return {
        "data": fingerprint.listing(files),
        "model": plan.model,
        "vae": plan.vae,
        "training.num_workers": cfg.training.num_workers,
        **settings,
    }
