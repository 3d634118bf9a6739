"""training/export: a run's DiT as a diffusers `PixArtTransformer2DModel` folder."""
from __future__ import annotations

from pathlib import Path

from shards.errors import SigmaError
from training import runs
from training.convert import diffusers_config, save_diffusers
from training.model import RELEASED_1024


def main(argv=None) -> None:
    from common import cli

    p = cli.parser("training/export", "Write a run's DiT as a diffusers PixArtTransformer2DModel folder "
                   "(loads into PixArtSigmaPipeline). KV-compressed models are refused: diffusers cannot express them.",
                   "training/export --run runs/1k --diffusers out/transformer")
    runs.add_source_args(p)
    p.add_argument("--diffusers", required=True, metavar="OUTDIR", help="folder to write config.json + weights into")
    p.add_argument("--stage", help="stage whose resolution and pe_interpolation to record (default: the run's name)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    stage_name = args.stage or (Path(args.run).name if args.run else None)
    stage = cfg.training.stages.get(stage_name) if stage_name else None
    if args.stage and stage is None:
        cli.fail(f"--stage {args.stage}: no such stage; choose one of {sorted(cfg.training.stages)}")
    try:
        ckpt = runs.source_checkpoint(args)
        # a bare checkpoint: record the released 1024 setup
        position = runs.position_setup(stage) if stage else {**RELEASED_1024, "multi_scale": True}
        if args.dry_run:
            cli.print_plan({"checkpoint": str(ckpt), "stage": stage_name if stage else None, "dit": cfg.models.dit,
                            **position, "out": args.diffusers})
            return
        model = runs.load_model(ckpt, cfg.models.dit, **position)
        out = save_diffusers(model, args.diffusers)
    except SigmaError as e:
        cli.fail(str(e))
    print(f"wrote {out} ({ckpt.name}, sample_size {model.input_size}, interpolation_scale "
          f"{diffusers_config(model)['interpolation_scale']})")
