"""Text -> image with a trained DiT: T5 prompt features, DPM-Solver++ with CFG, VAE decode.

`training/sample` is the command line; `Generator` is the same path as a reusable object (load T5,
VAE and DiT once, then `__call__(prompts, ...)`), e.g. for sample grids during training.

Unconditional branch, two conventions:
  official  (default) the DiT's null caption `y_embedding` (T5("") padded to 300) under the
            prompt's own mask: exactly what CFG dropout showed the model during training;
  diffusers T5("") with its own mask (one valid token), as `PixArtSigmaPipeline` does.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from encoders import t5 as t5_mod
from encoders import vae as vae_mod
from shards.errors import SigmaError
from training import diffusion


class Generator:
    """Holds T5, VAE and the DiT; `__call__(prompts, height, width, ...) -> [PIL images]`."""

    def __init__(self, model, t5_path: str, vae_path: str, device="cpu", dtype=torch.float32,
                 t5_dtype="float32", vae_dtype="float32", max_length: int = 300):
        self.device, self.dtype, self.max_length = torch.device(device), dtype, max_length
        self.tokenizer = t5_mod.load_tokenizer(t5_path)
        self.t5 = t5_mod.load_t5(t5_path, t5_dtype, device)
        self.vae = vae_mod.load_vae(vae_path, vae_dtype, device)
        self.use(model)

    def use(self, model) -> None:
        """Generate with this DiT from now on (T5 and the VAE stay loaded); its null caption is set to
        T5("") padded to its length, as the official loader does."""
        self.model = model.to(self.device, self.dtype).eval()
        null = t5_mod.null_caption_embedding(self.tokenizer, self.t5, model.y_embedding.shape[0])  # [L, C]
        self.model.set_null_caption(null)

    def encode(self, prompts: list[str]):
        """Prompt features zero-padded to the longest prompt: ([N, L, C], mask [N, L])."""
        feats, lengths = t5_mod.encode_captions(self.tokenizer, self.t5, prompts, max_length=self.max_length)
        L = max(lengths)
        y = torch.zeros(len(prompts), L, feats[0].shape[1])  # [N, L, C]
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)  # [N, L]
        for i, f in enumerate(feats):
            y[i, :len(f)], mask[i, :len(f)] = f, True
        return y, mask

    def null_branch(self, mask: torch.Tensor, uncond: str):
        if uncond == "official":
            L = self.model.y_embedding.shape[0]
            null_mask = torch.zeros(mask.shape[0], L, dtype=torch.bool)  # [N, L]
            n = min(mask.shape[1], L)
            null_mask[:, :n] = mask[:, :n]
            return self.model.y_embedding[None].float().cpu(), null_mask  # [1, L, C]
        return self.encode([""])

    @torch.no_grad()
    def latents(self, prompts, height, width, steps=20, cfg_scale=4.5, seed=0, uncond="official"):
        if height % 16 or width % 16:
            raise SigmaError(f"size {height}x{width}: height and width must be multiples of 16 (VAE x8, patch 2)")
        y, mask = self.encode(prompts)
        null_y, null_mask = self.null_branch(mask, uncond)
        gen = torch.Generator().manual_seed(seed)
        shape = (len(prompts), self.model.in_channels, height // 8, width // 8)
        return diffusion.sample(self.model, shape, y, mask, null_y, null_mask, steps, cfg_scale, gen)  # [N, 4, h, w]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        param = next(self.vae.parameters())
        z = latents.to(param.device, param.dtype) / vae_mod.scaling_factor(self.vae)
        pixels = self.vae.decode(z).sample.float().clamp(-1, 1)  # [N, 3, H, W]
        arr = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]

    def __call__(self, prompts, height, width, **kw) -> list[Image.Image]:
        return self.decode(self.latents(prompts, height, width, **kw))


def parse_size(text: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768) as (height, width)."""
    h, sep, w = text.lower().partition("x")
    if not sep or not h.isdigit() or not w.isdigit():
        raise SigmaError(f"--size {text}: expected HEIGHTxWIDTH, e.g. 1024x1024")
    return int(h), int(w)


def main(argv=None) -> None:
    import io

    from common import cli
    from shards.atomic import write_bytes
    from training import runs

    p = cli.parser("training/sample", "Generate an image from a prompt with a trained PixArt-Sigma DiT "
                   "(DPM-Solver++ with classifier-free guidance; T5 and VAE from the config's models).",
                   'training/sample --run runs/1k --prompt "A red fox in the snow" --size 1024x1024 --out fox.png')
    runs.add_source_args(p)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--size", default="1024x1024", help="HEIGHTxWIDTH in pixels, multiples of 16 (default 1024x1024)")
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps (default 20)")
    p.add_argument("--cfg", type=float, default=4.5, help="classifier-free guidance scale (default 4.5; 1 = off)")
    p.add_argument("--seed", type=int, default=0, help="initial-noise seed")
    p.add_argument("--uncond", choices=["official", "diffusers"], default="official",
                   help="unconditional branch: null caption under the prompt's mask (official) or T5('') (diffusers)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="PNG file to write")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    try:
        height, width = parse_size(args.size)
    except SigmaError as e:
        cli.fail(str(e))
    stage = cfg.training.stages.get(Path(args.run).name) if args.run else None
    try:
        ckpt = runs.source_checkpoint(args)
    except SigmaError as e:
        cli.fail(str(e))
    position = runs.position_setup(stage)
    if height != width or height != position["input_size"] * 8:
        position["multi_scale"] = True  # a single-scale stage equals multi-scale at its own size
    if args.dry_run:
        cli.print_plan({"checkpoint": str(ckpt), "dit": cfg.models.dit, **position, "t5": cfg.models.t5,
                        "vae": cfg.models.vae, "size": [height, width], "steps": args.steps, "cfg": args.cfg,
                        "seed": args.seed, "uncond": args.uncond, "device": args.device, "out": args.out})
        return
    try:
        model = runs.load_model(ckpt, cfg.models.dit, **position)
        dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
        gen = Generator(model, cfg.models.t5, cfg.models.vae, args.device, dtype,
                        t5_dtype=cfg.encode.t5_dtype, vae_dtype=cfg.encode.vae_dtype,
                        max_length=cfg.encode.t5_max_length)
        image = gen([args.prompt], height, width, steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                    uncond=args.uncond)[0]
    except SigmaError as e:
        cli.fail(str(e))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_bytes(args.out, buf.getvalue())
    print(f"wrote {args.out} ({width}x{height}, {args.steps} steps, cfg {args.cfg}, seed {args.seed}, {ckpt.name})")
