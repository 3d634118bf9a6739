"""`evaluation/generate --pipeline SRC --prompts P --out EVALDIR/images/NAME`: a study's images from any
diffusers pipeline, so the released PixArt-Σ (or SDXL, or a run exported with training/export) sits
beside a run in the same study.

SRC is a pipeline folder or a hub id, loaded with `diffusers.DiffusionPipeline.from_pretrained`
(its own `model_index.json` names the class). Every (prompt, seed) is generated alone with
`generator=torch.Generator().manual_seed(seed)`, at exactly --size (`use_resolution_binning=False`
where the pipeline has it), with the pipeline's own scheduler, --steps and --cfg: the same
prompts, seeds, size, steps and guidance as `training/sample --prompts`. Images and sidecars go
where shards/evalset.py says, with generation.json recording the pipeline, its class, scheduler
and components.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

from shards import evalset, storage
from shards.errors import SigmaError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (height, width), multiples of 8 (the pipeline checks its own rules)."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit() or int(h) % 8 or int(w) % 8 or not int(h) or not int(w):
        raise SigmaError(f"--size {text}: expected HEIGHTxWIDTH in pixels, multiples of 8, e.g. 1024x1024")
    return int(h), int(w)


def check_source(source: str) -> str:
    """A pipeline folder (with model_index.json), a hub id, or a folder in a bucket (copied once into the
    model cache when it loads: encoders/hub.py); anything else is a one-line error."""
    from encoders import hub

    if hub.in_bucket(source):
        return source
    path = Path(source)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise SigmaError(
                f"--pipeline {source}: not a diffusers pipeline folder (no model_index.json; "
                "training/export --run RUN --diffusers OUT writes one)"
            )
        return str(path.resolve())
    if not HUB_ID.match(source) or source.startswith((".", "/")):
        raise SigmaError(f"--pipeline {source}: no such folder, and not a hub id (owner/name)")
    return source


def load_pipeline(source: str, device: str, dtype: torch.dtype, revision: str | None = None):
    from diffusers import DiffusionPipeline

    from encoders import hub

    local = hub.require(source, "--pipeline", revision, what="diffusers pipeline")  # a bucket's: its local copy
    if hub.in_bucket(source) and not (Path(local) / "model_index.json").is_file():
        raise SigmaError(f"--pipeline {source}: not a diffusers pipeline folder (no model_index.json)")
    try:
        pipe = DiffusionPipeline.from_pretrained(local, torch_dtype=dtype, revision=revision)
    except (OSError, ValueError) as e:
        raise SigmaError(f"--pipeline {source}: cannot load ({str(e).splitlines()[0][:200]})") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def maker(pipe, height: int, width: int, steps: int, cfg: float):
    """`make(prompt, seed) -> PIL image` for shards.evalset.write_folder."""
    params = inspect.signature(pipe.__call__).parameters
    extra = {"use_resolution_binning": False} if "use_resolution_binning" in params else {}

    def make(prompt: str, seed: int):
        return pipe(
            prompt,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=cfg,
            generator=torch.Generator().manual_seed(seed),
            **extra,
        ).images[0]

    return make


def record(pipe, source: str, revision: str | None, steps: int, dtype) -> dict:
    """generation.json: what made the folder."""
    components = {k: type(v).__name__ for k, v in pipe.components.items() if v is not None}
    return {
        "generator": "evaluation/generate",
        "pipeline": source,
        "revision": revision,
        "class": type(pipe).__name__,
        "sampler": f"{type(pipe.scheduler).__name__} ({steps} steps)",
        "dtype": str(dtype).removeprefix("torch."),
        "models": components,
    }


def main(argv=None) -> None:
    from common import cli

    p = cli.parser(
        "evaluation/generate",
        "Generate an evaluation folder's images with any diffusers pipeline "
        "(a folder, e.g. a training/export, or a hub id): one image per prompt and seed, the same "
        "prompts, seeds, size, steps and guidance as training/sample --prompts.",
        "evaluation/generate --pipeline PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --prompts prompts.txt "
        "--out eval/images/pixart-sigma",
    )
    p.add_argument("--pipeline", required=True, help="diffusers pipeline folder (local or in a bucket) or hub id")
    p.add_argument("--revision", default=None, help="hub revision to load (a commit hash pins it)")
    p.add_argument("--prompts", required=True, help="prompt file: .txt, .jsonl, or MJHQ-30K's meta_data.json")
    p.add_argument("--seeds", default="0,1", help="initial-noise seeds (default 0,1)")
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH in pixels (default 1024x1024)")
    p.add_argument("--steps", type=int, default=20, help="inference steps (default 20, PixArt-Sigma's)")
    p.add_argument("--cfg", type=float, default=4.5, help="guidance scale (default 4.5, PixArt-Sigma's)")
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    p.add_argument("--out", required=True, help="the image folder: EVALDIR/images/NAME (NAME names the model)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    from encoders import hub

    hub.configure(cfg.storage)  # model folders given as bucket URLs: copied once into storage.cache.models
    try:
        out = storage.resolve(args.out, cfg.storage)  # a local folder or a bucket URL
        height, width = parse_size(args.size)
        if args.steps < 1:
            raise SigmaError(f"--steps {args.steps}: must be at least 1")
        seeds = evalset.parse_seeds(args.seeds)
        source = check_source(args.pipeline)
    except SigmaError as e:
        cli.fail(str(e))
    not_checked: list[str] = []
    try:
        prompts = evalset.read_prompts(args.prompts)
    except SigmaError as e:
        if not args.dry_run or Path(args.prompts).exists():  # a file that is there must be right
            cli.fail(str(e))
        prompts, not_checked = [], [cli.unchecked(str(e))]
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    if args.dry_run:
        cli.print_plan(
            {
                "pipeline": source,
                "revision": args.revision,
                "prompts": len(prompts),
                "seeds": seeds,
                "size": [height, width],
                "steps": args.steps,
                "cfg": args.cfg,
                "device": args.device,
                "images": len(prompts) * len(seeds),
                "out": args.out,
                **({"not_checked": not_checked} if not_checked else {}),
            }
        )
        return
    try:
        pipe = load_pipeline(source, args.device, dtype, args.revision)
    except SigmaError as e:
        cli.fail(str(e))
    settings = {
        "stage": None,
        "steps": args.steps,
        "cfg": args.cfg,
        "size": [height, width],
        "uncond": "pipeline",
        "checkpoint": source,
    }
    made = evalset.write_folder(
        maker(pipe, height, width, args.steps, args.cfg),
        out,
        prompts,
        seeds,
        settings,
        {**record(pipe, source, args.revision, args.steps, dtype), "prompts_file": str(Path(args.prompts).resolve())},
    )
    print(
        f"{Path(args.out).name}: {made} images generated, {len(prompts) * len(seeds) - made} already there ({args.out})"
    )
