"""`training/finetune --stage S`: one stage of weak-to-strong training, DDP through torchrun.

    python training/finetune --stage 256 --data enc/256 --profile demo         # one process (CPU or one GPU)
    torchrun --nproc_per_node=8 training/finetune --stage 2k --data enc/2k     # one process per GPU (NCCL)

`train` is the whole trainer (nanoGPT / DiT style): the loop's DDP, bf16 autocast, gradient
accumulation, clipping, warm-up, EMA, logging, sample grids and checkpoints are explicit lines
there or in the named setup functions above it, not hooks.

Reproducibility: the data of one optimizer step depends only on (seed, step, world_size x
grad_accum). Each process reads `grad_accum` loader streams, one per "virtual rank"
rank * grad_accum + micro, so 2 GPUs x accum 1 and 1 GPU x accum 2 see the same samples; the
timesteps, noise and CFG drops of a micro-batch come from a generator seeded with (seed, step,
virtual rank). The loader streams restart at every checkpoint, seeded with its step
(webdataset streams cannot seek), so a resumed run continues to the same loss curve.
A run records its fingerprint (data listing + the settings that change its weights) on the first
start; a resume with another one is refused, naming what changed.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from common import cli, progress
from encoders import hub
from shards import atomic, cache, encoded, fingerprint, loader
from shards.errors import SigmaError
from training import checkpoint, runfolder, runs, sample, stages, summary
from training.diffusion import GaussianDiffusion
from training.model import DiT_models
from training.plan import Plan, check_models, position_warning, prepare, run_fingerprint

EXAMPLE = "training/finetune --stage 256 --data enc/256 --profile demo"


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)  # e = decay * e + (1 - decay) * p


def ema_decay(target: float, step: int) -> float:
    """Warm-up min(target, (1 + step) / (10 + step)) (diffusers' EMAModel): at 0.9999 a plain EMA
    is still ~90% the starting weights after a 1,000-step stage."""
    return min(target, (1 + step) / (10 + step))


def make_optimizer(name: str, params, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, or CAME with the official PixArt-Σ settings (betas 0.9/0.999/0.9999, eps 1e-30/1e-16)."""
    if name == "came":
        from came_pytorch import CAME  # `pip install came-pytorch` (the `gpu` extra)

        return CAME(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999))


def step_generator(seed: int, step: int, vrank: int) -> torch.Generator:
    """The randomness (t, noise, CFG drop) of one micro-batch, independent of the process layout."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + vrank)


# ---------------------------------------------------------------------------------------------
# Setup, in the order train() calls it
# ---------------------------------------------------------------------------------------------


@dataclass
class Dist:
    """This process in the DDP job (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)."""

    ddp: bool
    rank: int
    world: int
    local: int
    device: torch.device

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_dist() -> Dist:
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Dist(ddp, rank, world, local, device)


@dataclass
class State:
    """What the loop updates and a checkpoint saves."""

    model: torch.nn.Module
    ema: torch.nn.Module | None
    opt: torch.optim.Optimizer
    step: int


def build_state(cfg, plan: Plan, stage, d: Dist, say) -> State:
    """The model with this stage's position setup (same init on every rank), EMA and optimizer, resumed
    from the newest readable checkpoint or initialised from the plan's starting weights."""
    torch.manual_seed(stage.seed)
    model = DiT_models[plan.model["size"]](**{k: v for k, v in plan.model.items() if k != "size"})
    found = checkpoint.load_resumable(plan.rundir, ema=stage.ema_decay is not None)
    if found is not None:
        model.load_state_dict(found[1])
    elif plan.init:
        kv_fresh = stages.load_init(model, stages.read_weights(plan.init), plan.init)
        say(
            f"initialised from {plan.init}"
            + (f" ({len(kv_fresh)} KV-compression tensors at their average init)" if kv_fresh else "")
        )
    model.set_null_caption(loader.null_caption(plan.data))  # T5("") of this data: the CFG null caption
    model.grad_checkpointing = stage.grad_checkpointing
    model.to(d.device).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval() if stage.ema_decay is not None and d.master else None
    opt = make_optimizer(stage.optimizer, model.parameters(), lr=stage.lr, weight_decay=stage.weight_decay)
    state = State(model, ema, opt, 0)
    if found is not None:
        resume(state, found, stage, d, say)
    return state


def resume(state: State, found: tuple, stage, d: Dist, say) -> None:
    _, _, ema_sd, trainer, skipped = found
    for line in skipped:
        say(line)
    state.opt.load_state_dict(trainer["optimizer"])
    state.step = trainer["step"]
    if state.ema is not None and ema_sd is not None:
        state.ema.load_state_dict(ema_sd)
    if len(trainer["rng"]) == d.world:
        checkpoint.set_rng_state(trainer["rng"][d.rank])
    say(f"resuming from step {state.step}")
    if trainer["layout"] != [d.world, stage.grad_accum]:
        say(
            f"note: checkpoint was written by {trainer['layout'][0]} processes x accum {trainer['layout'][1]}, "
            f"now {d.world} x {stage.grad_accum}: the data order changes from here"
        )


class Streams:
    """grad_accum loader streams per process (virtual ranks), restarted at each checkpoint."""

    def __init__(self, cfg, plan: Plan, stage, d: Dist):
        self.cfg, self.plan, self.stage, self.d = cfg, plan, stage, d
        self.max_length = encoded.read_info(plan.data)["max_length"]
        self.its: list = []
        c = cfg.storage.cache  # a bucket ENCDIR is read through this node's cache; a local one in place
        self.cache = cache.ShardCache(c.shards_folder, c.max_bytes)

    def restart(self, epoch: int) -> None:
        st, d = self.stage, self.d
        self.its = []
        for micro in range(st.grad_accum):
            dl = loader.make_loader(
                self.plan.data,
                batch_size=st.batch_size,
                model_max_length=self.max_length,
                rule=stages.caption_rule(st, f"training.stages.{self.plan.stage}"),
                seed=st.seed,
                num_workers=self.cfg.training.num_workers,
                rank=d.rank * st.grad_accum + micro,
                world_size=d.world * st.grad_accum,
                resample=True,
                tier=st.tier,
                pin_memory=d.device.type == "cuda",
                cache=self.cache,
                read_ahead=self.cfg.storage.cache.read_ahead,
            )
            dl.dataset.set_epoch(epoch)
            self.its.append(iter(dl))

    def next(self, micro: int) -> dict:
        side = self.plan.resolution
        while True:
            try:
                batch = next(self.its[micro])
            except SigmaError as e:  # from a loader worker (a shard gone from the bucket): its one line
                raise loader.worker_error(e) from None
            if self.stage.multi_scale or batch["bucket_hw"] == (side, side):
                return batch  # a single-scale stage (256) trains on its square bucket only


class Logger:
    """Rank 0's outputs: log.txt, TensorBoard, sample grids (on disk or a store: training/runfolder.py);
    a no-op on the other ranks."""

    def __init__(self, cfg, plan: Plan, d: Dist):
        tc = cfg.training
        self.master, self.rundir, self.writer, self.gen = d.master, plan.rundir, None, None
        self.prompts, self.steps, self.cfg_scale = tc.sample_prompts, tc.sample_steps, tc.cfg_scale
        if not self.master:
            return
        from torch.utils.tensorboard import SummaryWriter  # ~2 s: only where it is used

        self.folder = runfolder.RunFolder(self.rundir)  # on a store: takes the run's lease
        checkpoint.clean_partial(self.rundir)
        if plan.resume is None:
            atomic.write_text(self.rundir / runs.RUN_INFO, json.dumps(plan.record(), indent=2, default=str) + "\n")
        self.writer_for = lambda step: SummaryWriter(str(self.folder.tb_dir), purge_step=step + 1)
        if cfg.training.sample_every and self.prompts:
            e = cfg.encode
            models = runs.models_for(cfg, plan.rundir, plan.stage, named=set())  # the data's T5 and VAE
            self.gen = sample.Generator(
                None,
                models.t5,
                models.vae,
                d.device,
                t5_dtype=models.t5_dtype,
                vae_dtype=e.vae_dtype,
                max_length=models.max_length,
                vae_tiling=e.vae_tiling,
                vae_slicing=e.vae_slicing,
            )
            self.gen.fix_prompts(self.prompts)  # T5 is freed: an XXL T5 is ~10 GB

    def start(self, step: int) -> None:
        """TensorBoard from `step` on: events after the checkpoint step are dropped (they are redone)."""
        if self.master:
            self.writer = self.writer_for(step)

    def say(self, line: str) -> None:
        if self.master:
            progress.say(line)
            self.folder.write(line)

    def scalars(self, step: int, total: int, values: dict, captions: Counter | None = None) -> None:
        """One log line + TensorBoard; `captions`: how often each caption set was drawn in the window
        (this process's batches: rank 0 sees 1 / world_size of the data), as `captions/<set>` shares."""
        if captions:
            n = sum(captions.values())
            values = {**values, **{f"captions/{k}": v / n for k, v in sorted(captions.items())}}
        self.say(summary.log_line(step, total, values))
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, step)
        self.writer.flush()

    def grid(self, step: int, plan: Plan, model, autocast) -> None:
        with autocast():
            z = self.gen.latents(
                self.prompts,
                plan.resolution,
                plan.resolution,
                steps=self.steps,
                cfg_scale=self.cfg_scale,
                seed=plan.settings["seed"],
                model=model,
            )
        png = sample.grid_png(self.gen.decode(z), self.prompts)
        atomic.write_bytes(self.rundir / "samples" / f"step-{step:07d}.png", png)
        image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))  # [H, W, 3] uint8
        self.writer.add_image(f"samples/{plan.stage}", image, step, dataformats="HWC")

    def sync(self) -> None:
        """Before a checkpoint: a store's log.txt and TensorBoard events uploaded (on disk: written as they go)."""
        if self.master:
            self.writer.flush()
            self.folder.sync()

    def close(self) -> None:
        if self.master:
            self.writer.close()
            self.folder.close()
            summary.write_summary(self.rundir)  # RUNDIR/summary.html: loss curves and the latest grid


def save_checkpoint(state: State, plan: Plan, d: Dist, accum: int, keep: int, log: Logger):
    """Every rank's RNG state gathered; rank 0 writes the checkpoint folder (on a store, if the run still
    holds its lease, after the store's log and TensorBoard events). Returns the folder (rank 0)."""
    states = [checkpoint.rng_state()]
    if d.ddp:  # gathered as bytes (all_gather_object cannot carry tensors here)
        buf, blobs = io.BytesIO(), [None] * d.world
        torch.save(states[0], buf)
        dist.all_gather_object(blobs, buf.getvalue())
        states = [torch.load(io.BytesIO(b), weights_only=True) for b in blobs]
    path = None
    if d.master:
        trainer = {
            "optimizer": state.opt.state_dict(),
            "rng": states,
            "layout": [d.world, accum],
            "data_epoch": state.step,
            "stage": plan.stage,
        }  # data position: streams restart here
        log.folder.check_owner()
        log.sync()  # before the commit: a checkpoint on a store never outlives the log lines up to it
        path = checkpoint.save(
            plan.rundir,
            state.step,
            model_sd=state.model.state_dict(),
            ema_sd=state.ema.state_dict() if state.ema is not None else None,
            state=trainer,
            keep=keep,
        )
    if d.ddp:
        dist.barrier()
    return path


def non_finite(d: Dist, step: int, loss_sum: torch.Tensor, values: tuple, keys: list, rundir: str) -> SigmaError:
    """The error for a non-finite step: every rank's keys of a non-finite local loss."""
    local = loss_sum.item()
    reports = [(d.rank, local, keys)]
    if d.ddp:
        reports = [None] * d.world
        dist.all_gather_object(reports, (d.rank, local, keys))
    bad = [k for _, v, ks in reports if not math.isfinite(v) for k in ks] or keys
    return SigmaError(
        f"step {step + 1}: non-finite loss {values[0]} (grad norm {values[1]}) on batch keys "
        f"{bad[:8]}; stopped without saving (last checkpoint: {checkpoint.latest(rundir) or 'none'})"
    )


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train(cfg, plan: Plan) -> None:
    stage, tc, total, accum = cfg.training.stages[plan.stage], cfg.training, plan.steps, plan.settings["grad_accum"]
    d = setup_dist()
    bf16 = stage.mixed_precision == "bf16"
    autocast = lambda: torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=bf16)
    log = Logger(cfg, plan, d)
    state = build_state(cfg, plan, stage, d, log.say)
    model = state.model
    ddp_model = (
        torch.nn.parallel.DistributedDataParallel(model, device_ids=[d.local] if d.device.type == "cuda" else None)
        if d.ddp
        else model
    )
    diffusion = GaussianDiffusion()
    streams = Streams(cfg, plan, stage, d)
    streams.restart(state.step)
    log.start(state.step)
    log.say(
        f"stage {plan.stage} ({' -> '.join(plan.chain)}): {total} steps, {d.world} process(es) x batch "
        f"{stage.batch_size} x accum {accum} = {plan.global_batch} per step, data {plan.data}"
    )
    if state.step >= total:
        log.say(f"stage {plan.stage} already at step {state.step} of {total}: nothing to do")

    win_loss, win_n, win_t, win_captions = 0.0, 0, 0.0, Counter()
    bar = progress.bar(total, "step", f"train {plan.stage}", initial=state.step, quiet=not d.master)
    while state.step < total:
        t0, step = time.time(), state.step
        lr = stage.lr * min(1.0, (step + 1) / max(1, stage.warmup_steps))  # linear warm-up, then constant
        for group in state.opt.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=d.device)
        keys = []
        for micro in range(accum):
            batch = streams.next(micro)
            x0 = batch["latent"].to(d.device, non_blocking=True)  # [B, 4, h, w]
            y = batch["y"].to(d.device, non_blocking=True)  # [B, L, C]
            mask = batch["mask"].to(d.device, non_blocking=True)  # [B, L]
            B = x0.shape[0]
            g = step_generator(stage.seed, step, d.rank * accum + micro)
            t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g).to(d.device)  # [B]
            noise = torch.randn(x0.shape, generator=g).to(d.device)  # [B, 4, h, w]
            drop = (torch.rand(B, generator=g) < stage.cfg_dropout).long().to(d.device)  # [B] CFG caption dropout
            sync = contextlib.nullcontext() if not d.ddp or micro == accum - 1 else ddp_model.no_sync()
            with sync:
                with autocast():
                    losses = diffusion.training_losses(
                        ddp_model,
                        x0,
                        t,
                        model_kwargs=dict(y=y, mask=mask, force_drop_ids=drop),
                        snr_gamma=stage.snr_gamma,
                        noise=noise,
                    )
                    loss = losses["loss"].mean() / accum
                loss.backward()
            loss_sum += loss.detach()
            keys += batch["keys"]
            win_captions.update(batch["caption_source"])
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        stats = torch.stack([loss_sum, grad_norm.to(d.device)])
        if d.ddp:
            dist.all_reduce(stats)
            stats /= d.world
        loss_val, norm_val = stats.tolist()  # the one host sync per step: check before the update
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            error = non_finite(d, step, loss_sum, (loss_val, norm_val), keys, plan.rundir)
            log.sync()  # a store's log.txt and events up to this step, as on disk
            raise error
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        if state.ema is not None:
            update_ema(state.ema, model, ema_decay(stage.ema_decay, step))
        state.step = step = step + 1
        win_loss, win_n, win_t = win_loss + loss_val, win_n + 1, win_t + time.time() - t0
        bar.set_postfix(loss=f"{loss_val:.4f}", refresh=False)
        bar.update(1)

        if d.master and (step % tc.log_every == 0 or step == total):
            step_time = win_t / win_n
            log.scalars(
                step,
                total,
                {
                    "train/loss": win_loss / win_n,
                    "train/lr": lr,
                    "train/grad_norm": norm_val,
                    "perf/samples_per_s": plan.global_batch / step_time,
                    "perf/step_time_s": step_time,
                },
                win_captions,
            )
            win_loss, win_n, win_t, win_captions = 0.0, 0, 0.0, Counter()
        if log.gen is not None and (step % tc.sample_every == 0 or step == total):
            log.grid(step, plan, state.ema if state.ema is not None else model, autocast)
        if step % tc.checkpoint_every == 0 or step == total:
            path = save_checkpoint(state, plan, d, accum, tc.keep_checkpoints, log)
            if path is not None:
                log.say(f"saved {path}")
            if step < total:
                streams.restart(step)
    bar.close()
    log.close()
    if d.ddp:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


@fingerprint.releases_locks  # the OUT lock is held for this run only
def main(argv: list[str] | None = None) -> None:
    p = cli.parser(
        "training/finetune",
        "Run one stage of PixArt-Sigma weak-to-strong fine-tuning (resumable; "
        "DDP under torchrun). Without --init a stage starts from its parent stage's run.",
        EXAMPLE,
    )
    p.add_argument("--stage", required=True, help="stage name in training.stages (256, vae, 512, 1k, 2k, 4k, kv)")
    p.add_argument("--data", help="ENCDIR written by encoding/encode (default: the stage's `data`)")
    p.add_argument(
        "--init",
        metavar="CKPT|RUNDIR",
        help="start from these weights instead of the parent stage's run (ignored when resuming), "
        "e.g. --stage 1k --init PixArt-Sigma-XL-2-1024-MS.pth to fine-tune the released model",
    )
    p.add_argument("--out", metavar="RUNDIR", help="run folder (default: <training.out>/<stage>)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (default: the stage's `steps`)")
    args = p.parse_args(argv)
    cfg = cli.load(args)
    hub.configure(cfg.storage)  # model folders given as bucket URLs: copied once into storage.cache.models
    not_checked: list[str] | None = [] if args.dry_run else None  # a dry run needs no data yet: it says so
    try:
        plan = prepare(cfg, args, not_checked)
        if not args.dry_run:
            check_models(cfg, plan)
        master = int(os.environ.get("RANK", 0)) == 0
        if master and not not_checked and (not args.dry_run or (plan.rundir / fingerprint.FILE).exists()):
            # records it on a first start (a dry run only reads)
            fingerprint.check(plan.rundir, run_fingerprint(cfg, plan), dry_run=args.dry_run)
    except SigmaError as e:
        cli.fail(str(e))
    warning = position_warning(
        plan, bool(args.init) or (plan.init is not None and not plan.chain[:-1]), cfg.training.stages
    )
    if warning and master:
        print(warning, file=sys.stderr, flush=True)
    if args.dry_run:
        for line in not_checked or []:
            cli.unchecked(line)
        cli.print_plan({**plan.record(), **({"not_checked": not_checked} if not_checked else {})})
        return
    try:
        train(cfg, plan)
    except SigmaError as e:
        if master:
            cli.fail(str(e))
        sys.exit(2)
