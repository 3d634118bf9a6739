"""training/export: a run's DiT as a complete diffusers `PixArtSigmaPipeline` folder.

    OUT/model_index.json   transformer/ (our weights)   text_encoder/ + tokenizer/ (the run's T5)
    vae/ (the run's VAE: its stage's)                   scheduler/ (DPM-Solver++, PixArt-Σ's settings)

so `PixArtSigmaPipeline.from_pretrained(OUT)` generates with its defaults. The T5 and VAE are the
ones the run's run.json records (`runs.resolve_models`; the config's for a bare checkpoint or with
`--use-config-models`), so no profile is needed. They are copied (re-saved), or with
`--encoders link` are absolute symlinks to those local folders (no 4.8 GB T5 per export; OUT then
breaks if they move); `--transformer-only`
writes just the transformer folder, to combine with a T5 and VAE the user already has. The folder
is written beside OUT and renamed into place, so a failed export leaves nothing half-written; a
non-empty OUT is refused unless `--force`. OUT may be a bucket URL (`s3://...`): the folder is
written to a local temp folder, then uploaded and committed by its marker object `_COMMITTED`,
written last (shards/storage.py; a reader checks it before loading); `--encoders link` is refused
there (a bucket has no links). KV-compressed models are refused before anything is
written: diffusers' `PixArtTransformer2DModel` has no KV compression (sample them with
training/sample instead).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from shards import storage
from shards.errors import SigmaError
from shards.storage import Loc
from training import runs
from training.convert import diffusers_config, save_diffusers

PIPELINE = "PixArtSigmaPipeline"
ENCODERS = ("copy", "link")  # --encoders choices


def check_out(out: Path | Loc, force: bool) -> None:
    if isinstance(out, Loc):  # a bucket: anything under the prefix
        if out.iterdir() and not force:
            raise SigmaError(f"--diffusers {out}: not empty; pass --force to replace it")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise SigmaError(f"--diffusers {out}: not empty; pass --force to replace it")


def link_targets(t5_path: str, vae_path: str) -> dict[str, Path]:
    """{pipeline entry: absolute local folder} for `--encoders link`. The tokenizer shares the T5
    folder (as everywhere in this project); a hub id, or a folder that is not the component itself
    (a whole pipeline with the component in a subfolder), is refused naming the component."""
    wanted = {
        "text_encoder": (t5_path, "config.json"),
        "tokenizer": (t5_path, "tokenizer_config.json"),
        "vae": (vae_path, "config.json"),
    }  # the file the pipeline reads first in each
    targets = {}
    for name, (path, marker) in wanted.items():
        folder = Path(path).expanduser()
        if not (folder / marker).is_file():
            raise SigmaError(
                f"--encoders link: {name} {path} is not a local folder with {marker} at its top; use --encoders copy"
            )
        targets[name] = folder.resolve()
    return targets


def write_pipeline(model, out: Path, t5_path: str, vae_path: str, links: dict[str, Path] | None = None) -> None:
    """The pipeline folder in `out` (which must not exist): transformer, T5 + tokenizer, VAE, scheduler;
    `links` (from `link_targets`) makes the last three symlinks instead of copies."""
    import diffusers
    from transformers import T5EncoderModel

    from encoders import t5 as t5_mod
    from encoders import vae as vae_mod
    from shards.atomic import write_text
    from training.diffusion import make_scheduler

    save_diffusers(model, out / "transformer")
    if links:
        for name, target in links.items():
            (out / name).symlink_to(target, target_is_directory=True)
    else:
        t5_mod.load_tokenizer(t5_path).save_pretrained(str(out / "tokenizer"))
        T5EncoderModel.from_pretrained(str(t5_path)).save_pretrained(str(out / "text_encoder"))
        vae_mod.load_vae(str(vae_path)).save_pretrained(str(out / "vae"))  # the one VAE loader: no accelerate hint
    make_scheduler().save_pretrained(str(out / "scheduler"))
    index = {
        "_class_name": PIPELINE,
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", tokenizer_class(out)],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    }
    write_text(out / "model_index.json", json.dumps(index, indent=2) + "\n")


def tokenizer_class(out: Path) -> str:
    cls = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text()).get("tokenizer_class", "T5Tokenizer")
    return cls.removesuffix("Fast") if cls.startswith("T5") else cls


def export(
    model,
    out: Path,
    t5_path: str | None,
    vae_path: str | None,
    transformer_only: bool,
    force: bool,
    links: dict[str, Path] | None = None,
) -> None:
    """Write into OUT.partial, then swap it in for OUT."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if transformer_only:
            save_diffusers(model, tmp)
        else:
            write_pipeline(model, tmp, t5_path, vae_path, links)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_out(out, force)  # again: another export may have filled it meanwhile
    # rmtree unlinks the symlinks inside OUT without following them: a linked T5/VAE survives --force
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def upload(model, out: Loc, t5_path: str | None, vae_path: str | None, transformer_only: bool, force: bool) -> None:
    """Export into a local temp folder, then upload it into bucket folder `out`, committed by its marker
    written last (an existing OUT, with --force, is removed first)."""
    with tempfile.TemporaryDirectory(prefix="sigmaforge-export-") as tmp:
        local = Path(tmp) / "pipeline"
        export(model, local, t5_path, vae_path, transformer_only, force=False)
        check_out(out, force)  # again: another export may have filled it meanwhile
        with storage.staging(out) as dest:
            for f in sorted(p for p in local.rglob("*") if p.is_file()):
                (dest / f.relative_to(local).as_posix()).upload(f)


def main(argv=None) -> None:
    from common import cli

    p = cli.parser(
        "training/export",
        "Write a run's DiT as a diffusers PixArtSigmaPipeline folder (transformer, "
        "T5, tokenizer, VAE, scheduler). KV-compressed models are refused: diffusers cannot express them.",
        "training/export --run runs/1k --diffusers out/pixart-1k",
    )
    runs.add_source_args(p)
    runs.add_model_args(p)
    p.add_argument(
        "--diffusers", required=True, metavar="OUTDIR", help="pipeline folder or bucket URL to write (must be empty)"
    )
    p.add_argument(
        "--stage",
        help="stage whose resolution and pe_interpolation to record (default: the run's; "
        "required for a --ckpt outside a run folder)",
    )
    p.add_argument("--transformer-only", action="store_true", help="write only the transformer folder")
    p.add_argument(
        "--encoders",
        choices=ENCODERS,
        default="copy",
        help="copy: re-save the T5, tokenizer and VAE into OUTDIR (default); link: make text_encoder/, "
        "tokenizer/ and vae/ absolute symlinks to the run's local T5 and VAE folders (no copy)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty OUTDIR")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    from encoders import hub

    hub.configure(cfg.storage)  # model folders given as bucket URLs: copied once into storage.cache.models
    try:
        where = storage.resolve(args.diffusers, cfg.storage)
    except SigmaError as e:
        cli.fail(str(e))
    out: Path | Loc = Path(args.diffusers) if where.is_local else where
    try:
        src = runs.resolve_source(args, cfg, args.stage, require_position=True)
    except SigmaError as e:
        if not args.dry_run:
            cli.fail(str(e))
        # a dry run before the run exists: say so, and show what the arguments and config decide
        cli.unchecked(str(e))
        cli.print_plan(
            {
                "checkpoint": None,
                "not_checked": [str(e)],
                "stage": args.stage,
                "dit": cfg.models.dit,
                "t5": None if args.transformer_only else cfg.models.t5,
                "encoders": args.encoders,
                "out": str(out),
            }
        )
        return
    try:
        check_out(out, args.force)
        linking = args.encoders == "link"
        if linking and args.transformer_only:
            raise SigmaError("--encoders link: --transformer-only writes no T5 or VAE to link")
        if linking and isinstance(out, Loc):
            raise SigmaError(f"--encoders link: a bucket has no links (--diffusers {out}); use --encoders copy")
        models = None if args.transformer_only else runs.resolve_models(args, cfg, src)
        t5_path, vae_path = (models.t5, models.vae) if models else (None, None)
        links = link_targets(t5_path, vae_path) if models and linking else None
        if args.dry_run:
            cli.print_plan(
                {
                    "checkpoint": str(src.checkpoint),
                    "stage": src.stage,
                    "dit": src.size,
                    **src.position,
                    "t5": t5_path,
                    "vae": vae_path,
                    "models_from": models.source if models else None,
                    "encoders": None if args.transformer_only else args.encoders,
                    "out": str(out),
                }
            )
            return
        model = runs.load_model(src.checkpoint, src.size, **src.position)
        if isinstance(out, Loc):
            upload(model, out, t5_path, vae_path, args.transformer_only, args.force)
        else:
            export(model, out, t5_path, vae_path, args.transformer_only, args.force, links)
    except SigmaError as e:
        cli.fail(str(e))
    print(summary(out, src, diffusers_config(model), models, args.encoders))


def summary(out: Path | Loc, src: runs.Source, config: dict, models: runs.Models | None, encoders: str) -> str:
    """What export wrote, for the terminal: the folder, the weights, the positions, the encoders."""
    lines = [
        f"wrote {out}: {PIPELINE if models else 'transformer only'} from {src.checkpoint}",
        f"  transformer  sample_size {config['sample_size']}, interpolation_scale {config['interpolation_scale']}"
        f" ({runs.position_text(src.position)}, {config['num_layers']} layers)",
    ]
    if models:
        how = "linked" if encoders == "link" else "copied"
        lines += [
            f"  text_encoder + tokenizer  {how} from {models.t5} ({models.source})",
            f"  vae  {how} from {models.vae} ({models.source})",
            "  scheduler  DPM-Solver++",
        ]
    return "\n".join(lines)
