"""`training/finetune --stage S`: one stage of weak-to-strong training, DDP through torchrun.

    python training/finetune --stage 256 --data enc/256 --profile demo         # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 training/finetune --stage 2k --data enc/2k     # one process per GPU (NCCL)

The loop in `train` is the whole trainer (nanoGPT / DiT style): DDP, bf16 autocast, gradient
accumulation, clipping, the warm-up schedule, EMA, logging, sample grids and checkpoints are
explicit lines there, not hooks.

Reproducibility: the data of one optimizer step depends only on (seed, step, world_size x
grad_accum). Each process reads `grad_accum` loader streams, one per "virtual rank"
rank * grad_accum + micro, so 2 GPUs x accum 1 and 1 GPU x accum 2 see the same samples; the
timesteps, noise and CFG drops of a micro-batch come from a generator seeded with (seed, step,
virtual rank). The loader streams restart at every checkpoint, seeded with its step
(webdataset streams cannot seek), so a resumed run continues to the same loss curve.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from common import cli, progress
from shards.errors import SigmaError
from training import checkpoint, stages

EXAMPLE = "training/finetune --stage 256 --data enc/256 --profile demo"




# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)  # e = decay * e + (1 - decay) * p


def ema_decay(target: float, step: int) -> float:
    """Warm-up min(target, (1 + step) / (10 + step)) (diffusers' EMAModel): at 0.9999 a plain EMA
    is still ~90% the starting weights after a 1,000-step stage."""
    return min(target, (1 + step) / (10 + step))


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or CAME with the official PixArt-Σ settings (betas 0.9/0.999/0.9999, eps 1e-30/1e-16)."""
    if name == "came":
        from came_pytorch import CAME  # `pip install came-pytorch` (the `gpu` extra)

        return CAME(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def step_generator(seed: int, step: int, vrank: int) -> torch.Generator:
    """The randomness (t, noise, CFG drop) of one micro-batch, independent of the process layout."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + vrank)


def rng_state() -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def grid_png(images: list) -> bytes:
    """PIL images of one size -> one PNG, ceil(sqrt(n)) columns."""
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


class Sampler:
    """The fixed-prompt sample grid: T5 encodes the prompts once (then is freed), the VAE decodes."""

    def __init__(self, cfg, stage, max_length: int, device):
        from encoders import t5 as t5_mod
        from encoders import vae as vae_mod

        tokenizer = t5_mod.load_tokenizer(cfg.models.t5)
        encoder = t5_mod.load_t5(cfg.models.t5, cfg.encode.t5_dtype, device)
        feats, _ = t5_mod.encode_captions(tokenizer, encoder, cfg.training.sample_prompts, max_length=max_length)
        del encoder  # an XXL T5 is ~10 GB: keep it only for these few prompts
        self.y = torch.zeros(len(feats), max_length, feats[0].shape[1])  # [N, L, C]
        self.mask = torch.zeros(len(feats), max_length, dtype=torch.bool)  # [N, L]
        for i, f in enumerate(feats):
            self.y[i, :len(f)], self.mask[i, :len(f)] = f, True
        e = cfg.encode
        self.vae = vae_mod.load_vae(stage.vae or cfg.models.vae, e.vae_dtype, device, e.vae_tiling, e.vae_slicing)
        self.scale = vae_mod.scaling_factor(self.vae)
        self.side = stages.resolution(stage)
        self.steps, self.cfg_scale, self.seed = cfg.training.sample_steps, cfg.training.cfg_scale, stage.seed

    @torch.no_grad()
    def __call__(self, model, autocast) -> bytes:
        from PIL import Image

        from training import diffusion

        gen = torch.Generator().manual_seed(self.seed)
        shape = (len(self.y), model.in_channels, self.side // 8, self.side // 8)
        # official CFG convention: the model's null caption under the prompt's own mask
        with autocast():
            z = diffusion.sample(model, shape, self.y, self.mask, model.y_embedding[None].float().cpu(), self.mask,
                                 self.steps, self.cfg_scale, gen)  # [N, 4, h, w]
        param = next(self.vae.parameters())
        pixels = self.vae.decode(z.to(param.device, param.dtype) / self.scale).sample.float().clamp(-1, 1)  # [N, 3, H, W]
        arr = ((pixels + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # [N, H, W, 3]
        return grid_png([Image.fromarray(np.ascontiguousarray(a)) for a in arr])


# ---------------------------------------------------------------------------------------------
# Resolving a run before any training (what --dry-run prints)
# ---------------------------------------------------------------------------------------------


def vae_config(path: str) -> dict:
    """The VAE's config.json (a local folder or a hub id), read without importing diffusers (~10 s)."""
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download

        folder = Path(hf_hub_download(path, "config.json")).parent
    return json.loads((folder / "config.json").read_text())


def prepare(cfg, args) -> dict:
    """Stage, data, RUNDIR and starting point of this run; SigmaError on any mismatch."""
    from shards import encoded, loader

    name = args.stage
    stage = stages.resolve(cfg, name)
    encdir = args.data or stage.data
    if not encdir:
        raise SigmaError(f"--stage {name}: no data; pass --data ENCDIR or set training.stages.{name}.data")
    info = encoded.read_info(encdir)
    if info["tier"] != stage.tier:
        raise SigmaError(f"--data {encdir}: encoded at tier {info['tier']}, stage {name} trains on tier {stage.tier}")
    vae_path = stage.vae or cfg.models.vae
    vae_cfg = vae_config(vae_path)
    loader.check_vae(encdir, float(vae_cfg.get("scaling_factor", 0.18215)), int(vae_cfg.get("latent_channels", 4)))
    side = stages.resolution(stage)
    if not stage.multi_scale and f"{side}x{side}" not in encoded.shards_by_bucket(encdir):
        raise SigmaError(f"--data {encdir}: stage {name} is single-scale (multi_scale: false) and needs the "
                         f"{side}x{side} bucket, which holds no sample")
    kw = stages.model_kwargs(stage, info["latent_channels"], info["t5_dim"], info["max_length"])
    from training.model import DiT_models

    if cfg.models.dit not in DiT_models:
        raise SigmaError(f"models.dit: unknown size {cfg.models.dit!r}; choose one of {list(DiT_models)}")
    with torch.device("meta"):  # checks the stage's model settings (e.g. KV layers beyond the depth) for free
        DiT_models[cfg.models.dit](**kw)
    rundir = stages.run_dir(cfg, name, args.out)
    resume = checkpoint.latest(rundir)
    init = None if resume else stages.init_source(cfg, name, args.init)
    world = int(os.environ.get("WORLD_SIZE", 1))
    steps = args.max_steps or stage.steps
    return dict(stage=name, chain=stages.chain(cfg, name), data=str(encdir), rundir=str(rundir),
                resume=str(resume) if resume else None, init=str(init) if init else None, steps=steps,
                world_size=world, global_batch=stage.batch_size * stage.grad_accum * world,
                model=dict(size=cfg.models.dit, **kw),
                vae=vae_path, settings=stage.__dict__)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg, run: dict) -> None:
    from shards import encoded, loader
    from training.diffusion import GaussianDiffusion
    from training.model import DiT_models

    stage = cfg.training.stages[run["stage"]]
    rundir, encdir, total = Path(run["rundir"]), run["data"], run["steps"]
    info = encoded.read_info(encdir)
    tc = cfg.training

    # DDP: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; one process per device
    ddp = "RANK" in os.environ
    cuda = torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])
    else:
        rank, world, local = 0, 1, 0
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    bf16 = stage.mixed_precision == "bf16"
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    # model: the named size with this stage's position setup; same init on every rank
    torch.manual_seed(stage.seed)
    kw = {k: v for k, v in run["model"].items() if k != "size"}
    model = DiT_models[cfg.models.dit](**kw)
    resume = checkpoint.latest(rundir)
    if resume is not None:
        model.load_state_dict(checkpoint.load_weights(resume / checkpoint.MODEL))
    elif run["init"]:
        kv_fresh = stages.load_init(model, stages.read_weights(Path(run["init"])), run["init"])
        if master:
            print(f"initialised from {run['init']}" + (f" ({len(kv_fresh)} KV-compression tensors at their "
                                                      f"average init)" if kv_fresh else ""), flush=True)
    model.set_null_caption(loader.null_caption(encdir))  # T5("") of this data: the CFG null caption
    model.grad_checkpointing = stage.grad_checkpointing
    model.to(device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval() if stage.ema_decay is not None and master else None
    opt = make_optimizer(stage.optimizer, model.parameters(), stage.lr, stage.weight_decay)
    step = 0
    if resume is not None:
        state = checkpoint.load_state(resume)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if ema is not None and (resume / checkpoint.EMA).exists():
            ema.load_state_dict(checkpoint.load_weights(resume / checkpoint.EMA))
        if len(state["rng"]) == world:
            set_rng_state(state["rng"][rank])
        if master:
            print(f"resuming from step {step}", flush=True)
            if state["layout"] != [world, stage.grad_accum]:
                print(f"note: checkpoint was written by {state['layout'][0]} processes x accum {state['layout'][1]}, "
                      f"now {world} x {stage.grad_accum}: the data order changes from here", flush=True)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local] if cuda else None) if ddp else model
    diffusion = GaussianDiffusion()

    # data: grad_accum streams per process (virtual ranks), restarted at each checkpoint
    accum, side = stage.grad_accum, stages.resolution(stage)

    def streams(epoch: int) -> list:
        its = []
        for micro in range(accum):
            dl = loader.make_loader(encdir, stage.batch_size, info["max_length"], stage.real_prompt_ratio, stage.seed,
                                    tc.num_workers, rank * accum + micro, world * accum, resample=True,
                                    tier=stage.tier, pin_memory=cuda)
            dl.dataset.set_epoch(epoch)
            its.append(iter(dl))
        return its

    def next_batch(it) -> dict:
        while True:
            batch = next(it)
            if stage.multi_scale or batch["bucket_hw"] == (side, side):
                return batch  # a single-scale stage (256) trains on its square bucket only

    its = streams(step)

    # logging (rank 0): plain text + TensorBoard; sample grids
    writer = sampler = None
    if master:
        from torch.utils.tensorboard import SummaryWriter

        rundir.mkdir(parents=True, exist_ok=True)
        checkpoint.clean_partial(rundir)
        if resume is None:
            from shards.atomic import write_text

            write_text(rundir / "run.json", json.dumps(run, indent=2, default=str) + "\n")
        writer = SummaryWriter(str(rundir / "tb"), purge_step=step)
        if tc.sample_every and tc.sample_prompts:
            sampler = Sampler(cfg, stage, info["max_length"], device)
    log = open(rundir / "log.txt", "a") if master else None

    def say(line: str) -> None:
        progress.say(line)
        log.write(line + "\n")
        log.flush()

    if master:
        say(f"stage {run['stage']} ({' -> '.join(run['chain'])}): {total} steps, {world} process(es) x batch "
            f"{stage.batch_size} x accum {accum} = {run['global_batch']} per step, data {encdir}")
    if step >= total and master:
        say(f"stage {run['stage']} already at step {step} of {total}: nothing to do")

    win_loss, win_n, win_t = 0.0, 0, 0.0
    bar = progress.bar(total, "step", f"train {run['stage']}", initial=step, quiet=not master)
    while step < total:
        t0 = time.time()
        lr = stage.lr * min(1.0, (step + 1) / max(1, stage.warmup_steps))  # linear warm-up, then constant
        for group in opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        keys = []
        for micro in range(accum):
            batch = next_batch(its[micro])
            x0 = batch["latent"].to(device, non_blocking=True)  # [B, 4, h, w]
            y = batch["y"].to(device, non_blocking=True)  # [B, L, C]
            mask = batch["mask"].to(device, non_blocking=True)  # [B, L]
            B = x0.shape[0]
            g = step_generator(stage.seed, step, rank * accum + micro)
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g).to(device)  # [B]
            noise = torch.randn(x0.shape, generator=g).to(device)  # [B, 4, h, w]
            drop = (torch.rand(B, generator=g) < stage.cfg_dropout).long().to(device)  # [B] CFG caption dropout
            sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else ddp_model.no_sync()
            with sync:
                with autocast():
                    losses = diffusion.training_losses(ddp_model, x0, t, dict(y=y, mask=mask, force_drop_ids=drop),
                                                       stage.snr_gamma, noise)
                    loss = losses["loss"].mean() / accum
                loss.backward()
            loss_sum += loss.detach()
            keys += batch["keys"]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        stats = torch.stack([loss_sum, grad_norm.to(device)])
        if ddp:
            local_loss = loss_sum.item()
            dist.all_reduce(stats)
            stats /= world
        loss_val, norm_val = stats.tolist()  # the one host sync per step: check before the update
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            reports = [(rank, local_loss if ddp else loss_val, keys)]
            if ddp:
                reports = [None] * world
                dist.all_gather_object(reports, (rank, local_loss, keys))
            bad = [k for _, v, ks in reports if not math.isfinite(v) for k in ks] or keys
            last = checkpoint.latest(rundir)
            raise SigmaError(f"step {step + 1}: non-finite loss {loss_val} (grad norm {norm_val}) on batch keys "
                                f"{bad[:8]}; stopped without saving (last checkpoint: {last or 'none'})")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, model, ema_decay(stage.ema_decay, step))
        step += 1
        win_loss, win_n, win_t = win_loss + loss_val, win_n + 1, win_t + time.time() - t0
        bar.set_postfix(loss=f"{loss_val:.4f}", refresh=False)
        bar.update(1)

        if master and (step % tc.log_every == 0 or step == total):
            step_time = win_t / win_n
            line = (f"step {step}/{total} loss {win_loss / win_n:.6f} lr {lr:.3e} grad_norm {norm_val:.4f} "
                    f"samples/s {run['global_batch'] / step_time:.1f} step_time {step_time:.3f}s")
            say(line)
            for tag, v in (("train/loss", win_loss / win_n), ("train/lr", lr), ("train/grad_norm", norm_val),
                           ("perf/samples_per_s", run["global_batch"] / step_time), ("perf/step_time_s", step_time)):
                writer.add_scalar(tag, v, step)
            writer.flush()
            win_loss, win_n, win_t = 0.0, 0, 0.0
        if sampler is not None and (step % tc.sample_every == 0 or step == total):
            png = sampler(ema if ema is not None else model, autocast)
            from shards.atomic import write_bytes

            write_bytes(rundir / "samples" / f"step-{step:07d}.png", png)
            grid = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # [H, W, 3] uint8
            writer.add_image(f"samples/{run['stage']}", grid, step, dataformats="HWC")
        if step % tc.checkpoint_every == 0 or step == total:
            states = [rng_state()]
            if ddp:  # every rank's RNG state, gathered as bytes (all_gather_object cannot carry tensors here)
                buf, blobs = io.BytesIO(), [None] * world
                torch.save(states[0], buf)
                dist.all_gather_object(blobs, buf.getvalue())
                states = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
            if master:
                state = {"optimizer": opt.state_dict(), "rng": states, "layout": [world, accum],
                         "data_epoch": step, "stage": run["stage"]}  # data position: streams restart here
                path = checkpoint.save(rundir, step, model.state_dict(), ema.state_dict() if ema is not None else None,
                                       state, tc.keep_checkpoints)
                say(f"saved {path}")
            if ddp:
                dist.barrier()
            if step < total:
                its = streams(step)
    bar.close()
    if master:
        writer.close()
        log.close()
        from training.summary import write_summary

        write_summary(rundir)  # RUNDIR/summary.html: loss curves and the latest grid
    if ddp:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("training/finetune", "Run one stage of PixArt-Sigma weak-to-strong fine-tuning (resumable; "
                   "DDP under torchrun). Without --init a stage starts from its parent stage's run.", EXAMPLE)
    p.add_argument("--stage", required=True, help="stage name in training.stages (256, vae, 512, 1k, 2k, 4k, kv)")
    p.add_argument("--data", help="ENCDIR written by encoding/encode (default: the stage's `data`)")
    p.add_argument("--init", metavar="CKPT|RUNDIR",
                   help="start from these weights instead of the parent stage's run (ignored when resuming)")
    p.add_argument("--out", metavar="RUNDIR", help="run folder (default: <training.out>/<stage>)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: the stage's `steps`)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    try:
        run = prepare(cfg, args)
    except SigmaError as e:
        cli.fail(str(e))
    if args.dry_run:
        cli.print_plan(run)
        return
    try:
        train(cfg, run)
    except SigmaError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            cli.fail(str(e))
        sys.exit(2)
