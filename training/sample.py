"""Text -> image with a trained DiT: T5 prompt features, DPM-Solver++ with CFG, VAE decode.

`training/sample` is the command line; `Generator` is the one sampling path (load T5, VAE and DiT
once, then `__call__(prompts, ...)`), used by the trainer's sample grids too. `--prompts FILE --seeds
0,1 --out EVALDIR/images/NAME` is the batch mode evaluation/ reads: one image per prompt and seed in
shards/evalset.py's layout, plus generation.json (how they were made).

Same-image parity with diffusers' `PixArtSigmaPipeline` needs two conventions to agree:
  unconditional branch  official (default): the DiT's null caption `y_embedding` (T5("") padded
                        to 300) under the prompt's own mask, exactly what CFG dropout showed the
                        model in training; diffusers: T5("") with its own mask (one valid token);
  prompt text           the pipeline lower-cases and strips prompts (`clean_caption=False`); we
                        encode them as given.
`--like-diffusers` (`Generator(..., like_diffusers=True)`) switches both, and then matches the
pipeline's latents for the same seed (tests/training/test_export.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from encoders import hub
from encoders import t5 as t5_mod
from encoders import vae as vae_mod
from shards import storage
from shards.errors import SigmaError
from training import diffusion

MAX_SIDE = 8192  # pixels: past any bucket of the 4K table, before a typo allocates terabytes
CAPTION_H = 14  # pixels of text under each image of a sample grid


class Generator:
    """Holds T5, VAE and the DiT; `__call__(prompts, height, width, ...) -> [PIL images]`."""

    def __init__(
        self,
        model,
        t5_path: str,
        vae_path: str,
        device="cpu",
        dtype=torch.float32,
        t5_dtype="float32",
        vae_dtype="float32",
        max_length: int = 300,
        *,
        vae_tiling: bool = False,
        vae_slicing: bool = False,
        keep_null: bool = False,
    ):
        self.device, self.dtype, self.max_length = torch.device(device), dtype, max_length
        self.t5_path, self.vae_path = str(t5_path), str(vae_path)  # what an evaluation folder records
        self.tokenizer = t5_mod.load_tokenizer(t5_path)
        self.t5 = t5_mod.load_t5(t5_path, t5_dtype, device)
        self.vae = vae_mod.load_vae(vae_path, vae_dtype, device, vae_tiling, vae_slicing)
        self.fixed: dict[str, tuple] = {}
        self.model = None
        if model is not None:
            self.use(model, keep_null)

    def use(self, model, keep_null: bool = False) -> None:
        """Generate with this DiT from now on (T5 and the VAE stay loaded). Its null caption is set
        to T5("") padded to its length, as the official loader does, unless `keep_null` (a run's
        checkpoint carries the null caption of its training data)."""
        self.model = model.to(self.device, self.dtype).eval()
        if not keep_null:
            self.model.set_null_caption(
                t5_mod.null_caption_embedding(self.tokenizer, self.t5, model.y_embedding.shape[0])
            )  # [L, C]

    def fix_prompts(self, prompts: list[str]) -> None:
        """Encode these prompts (and "") once, then free T5: an XXL T5 is ~10 GB (training grids)."""
        for p in [*prompts, ""]:
            self.fixed[p] = self.encode([p])
        self.t5 = None

    def encode(self, prompts: list[str]):
        """Prompt features zero-padded to the longest prompt: ([N, L, C], mask [N, L])."""
        if all(p in self.fixed for p in prompts):
            parts = [self.fixed[p] for p in prompts]
            feats, lengths = [y[0, : int(m.sum())] for y, m in parts], [int(m.sum()) for _, m in parts]
        else:
            feats, lengths = t5_mod.encode_captions(self.tokenizer, self.t5, prompts, max_length=self.max_length)
        L = max(lengths)
        y = torch.zeros(len(prompts), L, feats[0].shape[1])  # [N, L, C]
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # [N, L]
        for i, f in enumerate(feats):
            y[i, : len(f)], mask[i, : len(f)] = f, True
        return y, mask

    def null_branch(self, model, mask: torch.Tensor, uncond: str):
        if uncond == "official":
            L = model.y_embedding.shape[0]
            null_mask = torch.zeros(mask.shape[0], L, dtype=torch.bool)  # [N, L]
            n = min(mask.shape[1], L)
            null_mask[:, :n] = mask[:, :n]
            return model.y_embedding[None].float().cpu(), null_mask  # [1, L, C]
        return self.encode([""])

    @torch.no_grad()
    def latents(
        self,
        prompts,
        height,
        width,
        steps=20,
        cfg_scale=4.5,
        seed=0,
        uncond="official",
        like_diffusers=False,
        model=None,
    ):
        """Latents [N, 4, h, w]; `model` overrides the held DiT (the trainer's EMA, left in its mode)."""
        check_request(height, width, steps)
        model = model if model is not None else self.model
        if like_diffusers:
            prompts, uncond = [p.lower().strip() for p in prompts], "diffusers"
        y, mask = self.encode(prompts)
        null_y, null_mask = self.null_branch(model, mask, uncond)
        gen = torch.Generator().manual_seed(seed)
        shape = (len(prompts), model.in_channels, height // 8, width // 8)
        return diffusion.sample(model, shape, y, mask, null_y, null_mask, steps, cfg_scale, gen)  # [N, 4, h, w]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        param = next(self.vae.parameters())
        z = latents.to(param.device, param.dtype) / vae_mod.scaling_factor(self.vae)
        pixels = self.vae.decode(z).sample.float().clamp(-1, 1)  # [N, 3, H, W]
        arr = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]

    def __call__(self, prompts, height, width, **kw) -> list[Image.Image]:
        return self.decode(self.latents(prompts, height, width, **kw))


def grid_png(images: list[Image.Image], captions: list[str]) -> bytes:
    """Images of one size -> one PNG, ceil(sqrt(n)) columns, each caption written under its image."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    cell = h + CAPTION_H
    grid = Image.new("RGB", (cols * w, rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, text) in enumerate(zip(images, captions)):
        x, y = (i % cols) * w, (i // cols) * cell
        grid.paste(im, (x, y))
        draw.text((x + 2, y + h + 1), fit_text(draw, text, w - 4), fill="black")
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (height, width)."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise SigmaError(f"--size {text}: expected HEIGHTxWIDTH, e.g. 1024x1024")
    return int(h), int(w)


def check_request(height: int, width: int, steps: int) -> None:
    """Size and steps a sampler can run, checked before any model is loaded; sizes read H x W."""
    size = f"{height}x{width}"
    if not (0 < height <= MAX_SIDE and 0 < width <= MAX_SIDE):
        raise SigmaError(f"size {size} (HxW): height and width must be in 16..{MAX_SIDE}")
    if height % 16 or width % 16:
        raise SigmaError(f"size {size} (HxW): height and width must be multiples of 16 (VAE x8, patch 2)")
    if steps < 1:
        raise SigmaError(f"steps {steps}: must be at least 1")


def main(argv=None) -> None:
    from common import cli
    from shards.atomic import write_bytes
    from training import runs

    p = cli.parser(
        "training/sample",
        "Generate an image from a prompt with a trained PixArt-Sigma DiT "
        "(DPM-Solver++ with classifier-free guidance; T5 and VAE: the run's own, from its run.json); or, "
        "with --prompts, one image per prompt and seed into an evaluation folder.",
        'training/sample --run runs/1k --prompt "A red fox in the snow" --size 1024x1024 --out fox.png\n'
        "  training/sample --run runs/1k --prompts prompts.txt --seeds 0,1 --out eval/images/1k",
    )
    runs.add_source_args(p)
    runs.add_model_args(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the text prompt")
    what.add_argument(
        "--prompts",
        help="batch mode: a prompt file (.txt, .jsonl, or MJHQ-30K's meta_data.json); "
        "--out is then the folder EVALDIR/images/NAME",
    )
    p.add_argument("--seeds", default="0,1", help="batch mode: initial-noise seeds (default 0,1)")
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH in pixels, multiples of 16 (default 1024x1024)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (default 4.5; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed")
    p.add_argument(
        "--uncond",
        choices=["official", "diffusers"],
        default="official",
        help="unconditional branch: null caption under the prompt's mask (official) or T5('') (diffusers)",
    )
    p.add_argument(
        "--like-diffusers",
        action="store_true",
        help="the same image as diffusers' PixArtSigmaPipeline: --uncond diffusers and a lower-cased prompt",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda if available)",
    )
    p.add_argument("--out", required=True, help="PNG file to write (batch mode: the image folder)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    hub.configure(cfg.storage)  # model folders given as bucket URLs: copied once into storage.cache.models
    try:
        height, width = parse_size(args.size)
        check_request(height, width, args.steps)
        batch = batch_request(args)
    except SigmaError as e:
        if not (args.dry_run and args.prompts and not Path(args.prompts).exists()):
            cli.fail(str(e))
        cli.unchecked(str(e))  # a dry run before the prompt file exists
        batch = None
    try:
        src = runs.resolve_source(args, cfg)
        models = runs.resolve_models(args, cfg, src)
        position = runs.position_for_size(src.position, height, width)
    except SigmaError as e:
        if not args.dry_run:
            cli.fail(str(e))
        # a dry run before the run exists: say so, and show what the arguments and config decide
        cli.unchecked(str(e))
        cli.print_plan(
            {
                "checkpoint": None,
                "not_checked": [str(e)],
                "dit": cfg.models.dit,
                "t5": cfg.models.t5,
                "vae": cfg.models.vae,
                "size": [height, width],
                "steps": args.steps,
                "cfg": args.cfg,
                "seed": args.seed,
                "device": args.device,
                "out": args.out,
                **({"prompts": len(batch[0]), "seeds": batch[1]} if batch else {}),
            }
        )
        return
    if args.dry_run:
        cli.print_plan(
            {
                "checkpoint": str(src.checkpoint),
                "dit": src.size,
                **position,
                "t5": models.t5,
                "vae": models.vae,
                "models_from": models.source,
                "size": [height, width],
                "steps": args.steps,
                "cfg": args.cfg,
                "seed": args.seed,
                "uncond": "diffusers" if args.like_diffusers else args.uncond,
                "device": args.device,
                "out": args.out,
                **({"prompts": len(batch[0]), "seeds": batch[1]} if batch else {}),
            }
        )
        return
    try:
        model = runs.load_model(src.checkpoint, src.size, **position)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        gen = Generator(
            model,
            models.t5,
            models.vae,
            args.device,
            dtype,
            t5_dtype=models.t5_dtype,
            vae_dtype=cfg.encode.vae_dtype,
            max_length=models.max_length,
            keep_null=src.run is not None,
        )
        if batch:
            return write_batch(gen, args, src, position, *batch, storage.resolve(args.out, cfg.storage))
        image = gen(
            [args.prompt],
            height,
            width,
            steps=args.steps,
            cfg_scale=args.cfg,
            seed=args.seed,
            uncond=args.uncond,
            like_diffusers=args.like_diffusers,
        )[0]
    except SigmaError as e:
        cli.fail(str(e))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(storage.resolve(args.out, cfg.storage), buf.getvalue())  # a local file or a bucket object
    print(
        f"wrote {args.out} ({height}x{width} HxW, {args.steps} steps, cfg {args.cfg}, seed {args.seed}, "
        f"{src.checkpoint.name})"
    )


# ---------------------------------------------------------------------------------------------
# Batch mode: an evaluation folder (shards/evalset.py) for evaluation/
# ---------------------------------------------------------------------------------------------


def batch_request(args) -> tuple[list[dict], list[int]] | None:
    """(prompts, seeds) of `--prompts FILE --seeds ...`, read before any model loads; None: one image."""
    from shards import evalset

    if not args.prompts:
        return None
    if Path(args.out).suffix.lower() == ".png":
        raise SigmaError(f"--out {args.out}: with --prompts, --out is a folder (EVALDIR/images/NAME), not a PNG")
    return evalset.read_prompts(args.prompts), evalset.parse_seeds(args.seeds)


def write_batch(gen, args, src, position: dict, prompts: list[dict], seeds: list[int], out) -> None:
    """Every (prompt, seed) image of this run into --out (`out`, a Loc: a folder or a bucket URL); a rerun
    skips those whose sidecar matches."""
    from shards import evalset

    height, width = parse_size(args.size)
    uncond = "like-diffusers" if args.like_diffusers else args.uncond  # like-diffusers also lower-cases prompts
    settings = {
        "stage": src.stage,
        "steps": args.steps,
        "cfg": args.cfg,
        "size": [height, width],
        "uncond": uncond,
        "checkpoint": str(src.checkpoint),
    }
    record = {
        "generator": "training/sample",
        "run": str(src.run) if src.run else None,
        "dit": src.size,
        **position,
        "sampler": f"DPM-Solver++ ({args.steps} steps)",
        "like_diffusers": args.like_diffusers,
        "models": {
            "t5": gen.t5_path,
            "vae": gen.vae_path,
            "null_caption": "the run's checkpoint" if src.run else "T5('')",
        },
        "prompts_file": str(Path(args.prompts).resolve()),
    }
    make = lambda text, seed: gen(
        [text],
        height,
        width,
        steps=args.steps,
        cfg_scale=args.cfg,
        seed=seed,
        uncond=args.uncond,
        like_diffusers=args.like_diffusers,
    )[0]
    made = evalset.write_folder(make, out, prompts, seeds, settings, record)
    print(
        f"{Path(args.out).name}: {made} images generated, {len(prompts) * len(seeds) - made} already there ({args.out})"
    )
