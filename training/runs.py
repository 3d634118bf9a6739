"""Finding what a run produced: the `--run RUNDIR | --ckpt FILE` flags, a run's newest weights, the
model it trained (its `run.json`), the models it depends on, and a ready `PixArtSigma` built from them.

A run folder knows its model: training/finetune records the architecture (`model.size` and the
stage's model settings) in RUNDIR/run.json, so sample, export and evaluate take the size and the
position setup from there; a checkpoint file inside a run folder counts as that run. A bare
checkpoint gets the released 1024 setup (`DEFAULT_POSITION`), whose position grid spans the same
range as every official stage, unless a `--stage` says otherwise; a diffusers folder gets the one
its transformer config states.

A run also knows its encoders: run.json's `encoders` (T5 + tokenizer, the stage's VAE, the null
caption) is copied from the training data's ENCDIR/info.json at the first start (`encoders_record`),
and `resolve_models` hands those to sample, export and evaluate, so none of them needs the profile
the run was trained with. A config that names other models is refused unless `--use-config-models`.

A run folder's layout is `training/checkpoint.py`'s; `training/convert.py` reads the weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from shards import encoded, storage
from shards.errors import SigmaError
from shards.storage import Loc
from training import checkpoint
from training.convert import infer_arch, load_checkpoint, load_into, pipeline_sample_size
from training.model import RELEASED_1024

RUN_INFO = "run.json"
DEFAULT_POSITION = {**RELEASED_1024, "multi_scale": True}  # a bare checkpoint: PixArt-Sigma-XL-2-1024-MS
POSITION_KEYS = ("input_size", "pe_interpolation", "multi_scale")
ENCODERS = "encoders"  # run.json's record of the T5, tokenizer, VAE and null caption


@dataclass
class Source:
    """The weights to use and the model they belong to."""

    checkpoint: Path | Loc  # a Loc for a run on a store
    run: Path | Loc | None  # the run folder the weights come from, if any
    size: str  # named DiT size (`models.dit`)
    position: dict  # input_size / pe_interpolation / multi_scale
    stage: str | None  # the run's stage name, or the --stage given


def add_source_args(p) -> None:
    """`--run RUNDIR | --ckpt FILE`, the weights training/sample and training/export read."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder: its newest checkpoint (EMA preferred) and the model in its run.json")
    src.add_argument("--ckpt", help="a checkpoint: our .safetensors, an official .pth, or a diffusers folder")


def place(text: str | os.PathLike[str] | Loc, cfg=None) -> Path | Loc:
    """A run folder or checkpoint as given: a Loc stays one, a bucket URL becomes its Loc (with the
    config's `storage` options), a local path stays a Path (as typed: messages show it so)."""
    if isinstance(text, Loc):
        return text
    loc = storage.resolve(text, cfg.storage if cfg is not None else None)
    return Path(text) if loc.is_local else loc


def source_checkpoint(args, cfg=None) -> Path | Loc:
    """The weights file or folder that `add_source_args`' flags name."""
    return place(args.ckpt, cfg) if args.ckpt else find_run_checkpoint(place(args.run, cfg))


def find_run_checkpoint(run: str | os.PathLike[str] | Loc) -> Path | Loc:
    """The newest complete checkpoint of a run folder (`checkpoint.latest`, on disk or a store): its EMA
    weights if saved."""
    run = place(run)
    if not run.is_dir():
        raise SigmaError(f"{run}: run folder not found")
    newest = checkpoint.latest(run)
    if newest is None:
        marker = f" with {storage.MARKER} written last" if isinstance(run, Loc) and not run.is_local else ""
        raise SigmaError(
            f"{run}: no checkpoint in the run folder (expected {checkpoint.folder(run).name}/step-*/{marker})"
        )
    ema = newest / checkpoint.EMA
    return ema if ema.exists() else newest / checkpoint.MODEL


def run_of(ckpt: Path | Loc) -> Path | Loc | None:
    """The run folder holding checkpoint file `ckpt` (RUNDIR/checkpoints/step-*/x.safetensors), if any."""
    if isinstance(ckpt, Loc):
        parts = [ckpt.parent, ckpt.parent.parent, ckpt.parent.parent.parent]
    else:
        parts = list(ckpt.resolve().parents)
    if len(parts) >= 3 and parts[1].name == "checkpoints" and (parts[2] / RUN_INFO).exists():
        return parts[2]
    return None


def run_for(path: str | os.PathLike[str] | Loc) -> Path | Loc | None:
    """The run folder of a run folder or of a checkpoint file inside one."""
    path = place(path)
    return path if (path / RUN_INFO).exists() else run_of(path)


def recorded(path: str | os.PathLike[str] | Loc) -> tuple[str, dict] | None:
    """(size, position setup) that the run of `path` (a run folder or a checkpoint in one) recorded."""
    run = run_for(path)
    model = run_model(run) if run else None
    return (model["size"], {k: model[k] for k in POSITION_KEYS}) if model else None


def run_model(run: Path | Loc) -> dict | None:
    """The `model` entry of RUNDIR/run.json (size + model settings), None for a run without one."""
    try:
        info = json.loads((place(run) / RUN_INFO).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SigmaError(f"{run / RUN_INFO}: unreadable ({type(e).__name__})") from None
    model = info.get("model") if isinstance(info, dict) else None
    return model if isinstance(model, dict) and "size" in model else None


def resolve_source(args, cfg, stage_flag: str | None = None, require_position: bool = False) -> Source:
    """Weights, size and position setup from --run/--ckpt, the run's run.json and an optional --stage.

    `stage_flag` overrides the run's position setup only where they agree (else a one-line error);
    `require_position`: a bare checkpoint needs --stage (export records the setup for good).
    """
    stages = cfg.training.stages
    if stage_flag is not None and stage_flag not in stages:
        raise SigmaError(f"--stage {stage_flag}: no such stage; choose one of {sorted(stages)}")
    ckpt = source_checkpoint(args, cfg)
    run = place(args.run, cfg) if args.run else run_of(ckpt)
    found = recorded(run) if run else None
    flagged = position_setup(stages[stage_flag]) if stage_flag else None
    if found is not None:
        size, position = found
        if flagged is not None and flagged != position:
            raise SigmaError(
                f"--stage {stage_flag}: {position_text(flagged)}, but {run} was trained with "
                f"{position_text(position)} (run.json); drop --stage"
            )
        return Source(ckpt, run, size, position, stage_flag or run.name)
    by_name = run.name if run and run.name in stages else None
    stage = stage_flag or by_name
    if stage is None and (found := known_position(ckpt, stages)) is not None:
        return Source(ckpt, run, cfg.models.dit, found, None)  # a diffusers folder's config
    if stage is None and require_position:
        raise SigmaError(
            f"--ckpt {ckpt}: not inside a run folder, so its position setup is unknown; pass "
            f"--stage (one of {sorted(stages)})"
        )
    position = position_setup(stages[stage]) if stage else dict(DEFAULT_POSITION)
    return Source(ckpt, run, cfg.models.dit, position, stage)


# The released checkpoints' names -> the position setup they were trained with.
RELEASED = {
    "256x256": dict(input_size=32, pe_interpolation=0.5, multi_scale=False),
    "512-MS": dict(input_size=64, pe_interpolation=1.0, multi_scale=True),
    "1024-MS": DEFAULT_POSITION,
    "2K-MS": dict(input_size=256, pe_interpolation=4.0, multi_scale=True),
}


def known_position(weights: str | Path | Loc, stages: dict | None = None) -> dict | None:
    """The position setup starting weights were trained with: their run's run.json, a diffusers
    folder's transformer config (`diffusers_position`), a released checkpoint's name
    (PixArt-Sigma-XL-2-1024-MS.pth), else None (unknown)."""
    weights = place(weights)
    found = recorded(weights)
    if found is not None:
        return found[1]
    found = diffusers_position(weights, stages or {})
    if found is not None:
        return found
    return next((dict(p) for tag, p in RELEASED.items() if tag in weights.name), None)


def diffusers_position(path: Path | Loc, stages: dict) -> dict | None:
    """The setup a diffusers transformer (or pipeline) folder states: `sample_size` (the latent side)
    and `interpolation_scale` (diffusers' default: sample_size // 64, at least 1). A folder that
    training/export wrote for one of `stages` maps back to that stage's own setup (the 4K stage's
    360 latents were written as 256 with the scale that keeps the positions); any other folder is
    multi-scale at its sample_size, as diffusers recomputes the positions for every size."""
    folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or not isinstance(config.get("sample_size"), int):
        return None
    side = config["sample_size"]
    scale = float(config.get("interpolation_scale") or max(side // 64, 1))
    for stage in stages.values():
        own = position_setup(stage)
        written = pipeline_sample_size(own["input_size"])
        if written == side and abs(own["pe_interpolation"] * written / own["input_size"] - scale) < 1e-9:
            return own
    return dict(input_size=side, pe_interpolation=scale, multi_scale=True)


def stage_for(stages: dict, position: dict) -> str | None:
    """The first stage (in config order) that trains at this position setup, if any."""
    return next((name for name, stage in stages.items() if position_setup(stage) == position), None)


def position_setup(stage) -> dict:
    """`input_size` / `pe_interpolation` / `multi_scale` of a stage (a `common.config.Stage`)."""
    from shards.buckets import TIER_TABLES

    resolution = int(TIER_TABLES.get(stage.tier, stage.tier))
    return dict(input_size=resolution // 8, pe_interpolation=stage.pe_interpolation, multi_scale=stage.multi_scale)


def position_text(position: dict) -> str:
    return (
        f"{position['input_size'] * 8} px, pe_interpolation {position['pe_interpolation']}"
        f"{'' if position['multi_scale'] else ', single-scale'}"
    )


def position_for_size(position: dict, height: int, width: int) -> dict:
    """The setup to sample HxW with: a single-scale stage equals multi-scale at its own size."""
    if height != width or height != position["input_size"] * 8:
        return {**position, "multi_scale": True}
    return dict(position)


def load_model(path: str | Path | Loc, size: str, **position) -> torch.nn.Module:
    """A `PixArtSigma` shaped like the checkpoint's weights (num_heads from the named `size`)."""
    from training.model import DiT_models, PixArtSigma

    sd = load_checkpoint(path)
    arch = infer_arch(sd)
    if size not in DiT_models:
        raise SigmaError(f"models.dit: unknown size {size!r}; choose one of {list(DiT_models)}")
    with torch.device("meta"):
        named = DiT_models[size]()
    if named.hidden_size != arch["hidden_size"]:
        raise SigmaError(
            f"{path}: hidden size {arch['hidden_size']} does not match models.dit={size} ({named.hidden_size})"
        )
    model = PixArtSigma(num_heads=named.num_heads, **{**arch, **position})
    load_into(model, sd)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The models a run depends on: T5 + tokenizer, VAE, null caption (run.json's `encoders`)
# ---------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The T5 (its folder holds the tokenizer too) and VAE to generate with, and where they came from."""

    t5: str  # local folder or hub id (a recorded hub revision resolves to its cached snapshot)
    vae: str
    max_length: int  # T5 token budget of the training captions
    t5_dtype: str  # the dtype the training captions were encoded in
    source: str  # "run.json" or "config"


def encoders_record(encdir: encoded.Place, t5: str, vae: str) -> dict:
    """run.json's `encoders`: what the data in ENCDIR was encoded with, from its info.json (path or
    hub id, `model_id`, hub revision). `t5` / `vae` (the config's) stand in only for an ENCDIR
    written before info.json recorded its models; each entry says which (`from`)."""
    info = encoded.read_info(encdir)
    null = encoded.place(encdir) / info["null_caption"]

    def entry(name: str, fallback: str) -> dict:
        if info.get(name):
            facts, origin = {k: info.get(k) for k in (name, f"{name}_id", f"{name}_revision")}, "data"
            facts[f"{name}_id"] = facts[f"{name}_id"] or encoded.model_id(info[name])
        else:
            facts, origin = encoded.model_facts(name, fallback), "config"
        return {"path": facts[name], "id": facts[f"{name}_id"], "revision": facts[f"{name}_revision"], "from": origin}

    t5_entry = entry("t5", t5)  # the tokenizer is read from the T5's folder, as everywhere in this project
    null_caption = {
        "text": "",
        "length": info["max_length"],
        "file": str(null),
        "sha256": hashlib.sha256(null.read_bytes()).hexdigest(),
    }
    return {
        "t5": t5_entry,
        "tokenizer": dict(t5_entry),
        "vae": entry("vae", vae),
        "max_length": info["max_length"],
        "t5_dtype": info.get("t5_dtype"),
        "null_caption": null_caption,
    }


def run_encoders(run: Path | Loc) -> dict | None:
    """RUNDIR/run.json's `encoders`, None for a run recorded before runs knew their encoders."""
    try:
        info = json.loads((place(run) / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    record = info.get(ENCODERS) if isinstance(info, dict) else None
    return record if isinstance(record, dict) and {"t5", "vae", "max_length"} <= set(record) else None


def add_model_args(p) -> None:
    """`--use-config-models`, for the commands that generate with a run's T5 and VAE."""
    p.add_argument(
        "--use-config-models",
        action="store_true",
        help="generate with the config's models.t5 / VAE even where the run's run.json records others "
        "(default: the run's own, and a config naming others is an error)",
    )


def config_names(args) -> set[str]:
    """Which of the run's models ("t5", "vae") this command's config names: both with --config or
    --profile (the user chose a config), else the ones a --set names. Without any, the run's own
    models are used whatever the default config says."""
    if getattr(args, "config", None) or getattr(args, "profile", None):
        return {"t5", "vae"}
    keys = {o.partition("=")[0].strip() for o in getattr(args, "overrides", [])}
    named = {"t5"} if "models.t5" in keys else set()
    if "models.vae" in keys or any(k.startswith("training.stages.") and k.endswith(".vae") for k in keys):
        named.add("vae")
    return named


def resolve_models(args, cfg, src: Source) -> Models:
    """The T5 and VAE to generate from `src` with (sample, export; evaluate per run through `models_for`)."""
    return models_for(cfg, src.run, src.stage, config_names(args), getattr(args, "use_config_models", False))


def models_for(cfg, run: Path | Loc | None, stage: str | None, named: set, use_config: bool = False) -> Models:
    """A run's recorded T5 and VAE; the config's (`models.t5`, the stage's `vae` else `models.vae`)
    for a bare checkpoint, a run without the record, or `use_config`. A config model in `named`
    must be the recorded one (same `model_id` and hub revision: a moved folder is fine, changed
    files or another commit are not), else a one-line error naming both."""
    st = cfg.training.stages.get(stage) if stage else None
    config = {
        "t5": ("models.t5", cfg.models.t5),
        "vae": (f"training.stages.{stage}.vae", st.vae) if st and st.vae else ("models.vae", cfg.models.vae),
    }
    record = run_encoders(run) if run else None
    if record is None or use_config:
        return Models(config["t5"][1], config["vae"][1], cfg.encode.t5_max_length, cfg.encode.t5_dtype, "config")
    chosen = {}
    for name, (key, path) in config.items():
        entry = record[name]
        if name not in named:
            chosen[name] = recorded_path(entry, run, key)
        elif same_model(path, entry):
            chosen[name] = path
        else:
            now, then = encoded.model_revision(path), entry.get("revision")
            raise SigmaError(
                f"{key} {path}{f'@{now}' if now else ''}: {run} was trained with {name} "
                f"{entry['path']}{f'@{then}' if then else ''} (run.json); drop the config's model "
                f"(--profile/--set) or pass --use-config-models"
            )
    return Models(
        chosen["t5"],
        chosen["vae"],
        int(record["max_length"]),
        record.get("t5_dtype") or cfg.encode.t5_dtype,
        "run.json",
    )


def same_model(path: str, entry: dict) -> bool:
    """Whether `path` holds the model a run recorded: its `model_id` and (for a hub id) revision."""
    revision = encoded.model_revision(path)
    return encoded.model_id(path) == entry["id"] and (
        None in (revision, entry["revision"]) or revision == entry["revision"]
    )


def recorded_path(entry: dict, run: Path | Loc, key: str) -> str:
    """Where to load a recorded model from: its folder; for a hub id, the cached snapshot of the
    recorded revision if there is one (else the id: loading fetches it)."""
    path, revision = entry["path"], entry.get("revision")
    if Path(path).exists():
        return path
    if path.startswith(("/", "~", ".")):
        raise SigmaError(
            f"{run}: its {key.rpartition('.')[2]} {path} (run.json) is not there any more; point "
            f"{key} at where it is now (checked against the recorded id)"
        )
    if revision:
        from huggingface_hub import snapshot_download

        try:
            return snapshot_download(path, revision=revision, local_files_only=True)
        except Exception:  # noqa: BLE001 - any miss (not cached, offline): the id, as configured
            return path
    return path
