"""The GPU benchmark: real sizes, random weights, bf16 -> benchmarks/results/gpu.md.

On a CUDA machine (the lead runs it when a GPU is lent; one call, ~5 min):
  - DiT-XL/2 train step (bf16 autocast, fp32 weights, fused AdamW step included) and peak memory at
    the 1K, 2K and 4K square buckets, with and without KV compression (blocks 14-27, r = 2), at the
    per-GPU batch sizes of pipelines.yaml (1k: 12, 2k: 4, 4k: 1 with gradient checkpointing);
  - T5 encoder of t5-v1_1-xxl size (4.7B encoder params): captions/s at 300 tokens, batches padded
    to 300 vs padded only to the longest caption (lengths ~ PixArt-Σ recaptions, 100-250 tokens);
  - SDXL-layout VAE encode: images/s at 1024² and 2048².
  - `--caption-toy` (alone; prints and runs benchmarks/caption_toy.py's GPU version: long-only vs
    long + short captions on code-rendered shapes, more images, steps and seeds than on CPU);
  - `--captioning` (alone, ~6 min): Qwen2.5-VL-7B size (random weights, zeroed output rows past
    the tiny tokenizer's vocabulary so every token decodes), captions/s of the `hf` backend
    (HFCaptioner, here) vs the `vllm` backend (VLLMCaptioner, in vLLM's venv: `captioning/vllm-env
    --kind cuda` first), same 64 JPEGs, 200 new tokens each (EOS ignored), batches of 16 (hf) and
    all 64 in one engine call (vllm, as a Ray batch would be).
`--smoke` runs the same code at tiny sizes on CPU (tests the script; numbers are meaningless); its
captioning model is the tests' tiny Qwen2-VL, from demo/tiny_qwen2vl.py's builder.

Usage: python -m benchmarks.gpu [--smoke] [--captioning] [--out benchmarks/results/gpu.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from demo import tiny_qwen2vl
from training.model import DiT_models

ROOT = Path(__file__).resolve().parent.parent

REAL = dict(
    dit="XL/2",
    caption_channels=4096,
    buckets={"1K": (1024, 12, False), "2K": (2048, 4, False), "4K": (2880, 1, True)},
    kv_layers=list(range(14, 28)),
    t5=dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64),
    t5_batch=32,
    t5_batches=4,
    vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
    vae_sizes=(1024, 2048),
    vae_batch=2,
    warmup=2,
    repeats=5,
)
SMOKE = dict(
    dit="tiny",
    caption_channels=32,
    buckets={"1K": (64, 2, False), "2K": (128, 1, False), "4K": (160, 1, True)},
    kv_layers=[2, 3],
    t5=dict(vocab_size=1000, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    t5_batch=4,
    t5_batches=2,
    vae=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1),
    vae_sizes=(64, 128),
    vae_batch=1,
    warmup=1,
    repeats=1,
)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median seconds per call, peak GiB allocated; 0 on CPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
    return sorted(times)[len(times) // 2], peak


def dit_rows(p, device, autocast) -> list[str]:
    rows = []
    for name, (res, batch, ckpt) in p["buckets"].items():
        for kv in (False, True):
            model = opt = None
            try:
                torch.manual_seed(0)
                model = (
                    DiT_models[p["dit"]](
                        input_size=res // 8,
                        pe_interpolation=res / 512,
                        caption_channels=p["caption_channels"],
                        kv_compress_layers=p["kv_layers"] if kv else (),
                    )
                    .to(device)
                    .train()
                )
                model.grad_checkpointing = ckpt
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
                x = torch.randn(batch, 4, res // 8, res // 8, device=device)
                t = torch.randint(0, 1000, (batch,), device=device)
                y = torch.randn(batch, 300, p["caption_channels"], device=device)
                mask = torch.zeros(batch, 300, dtype=torch.bool, device=device)
                mask[:, :200] = True

                def step():
                    with autocast():
                        loss = model(x, t, y, mask).float().square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                sec, peak = measure(step, device, p["warmup"], p["repeats"])
                rows.append(
                    f"| {name} ({res}²) | {(res // 16) ** 2} | {batch} | {'yes' if ckpt else 'no'} | "
                    f"{'on' if kv else 'off'} | {sec:.3f} | {batch / sec:.2f} | {peak:.1f} |"
                )
            except torch.OutOfMemoryError:
                rows.append(
                    f"| {name} ({res}²) | {(res // 16) ** 2} | {batch} | {'yes' if ckpt else 'no'} | "
                    f"{'on' if kv else 'off'} | OOM | | |"
                )
            print(rows[-1], flush=True)
            model = opt = None  # not `del`: the step closure above refers to them (frees the GPU memory alike)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def t5_rows(p, device, dtype) -> list[str]:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        **p["t5"],
    )
    with torch.device(device):
        enc = T5EncoderModel(cfg).to(dtype).eval()
    g = torch.Generator().manual_seed(0)
    n = p["t5_batch"] * p["t5_batches"]
    lengths = torch.randint(100, 251, (n,), generator=g).sort().values  # sorted: what valid-length batching does
    ids = torch.randint(3, cfg.vocab_size, (n, 300), generator=g)
    rows = []
    for mode in ("padded to 300", "valid length"):

        def run():
            with torch.no_grad():
                for b in range(p["t5_batches"]):
                    lens = lengths[b * p["t5_batch"] : (b + 1) * p["t5_batch"]]
                    width = 300 if mode == "padded to 300" else int(lens.max())
                    mask = (torch.arange(width)[None] < lens[:, None]).long()
                    enc(
                        input_ids=ids[b * p["t5_batch"] : (b + 1) * p["t5_batch"], :width].to(device),
                        attention_mask=mask.to(device),
                    )

        sec, peak = measure(run, device, 1, max(1, p["repeats"] // 2))
        rows.append(f"| {mode} | {p['t5_batch']} | {n / sec:.1f} | {peak:.1f} |")
        print(rows[-1], flush=True)
    enc = None  # not `del`: the run closure above refers to it
    return rows


def vae_rows(p, device, dtype) -> list[str]:
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = (
            AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                scaling_factor=0.13025,
                **p["vae"],
            )
            .to(dtype)
            .eval()
        )
    rows = []
    for size in p["vae_sizes"]:
        x = torch.randn(p["vae_batch"], 3, size, size, device=device, dtype=dtype)

        def run():
            with torch.no_grad():
                _ = vae.encode(x).latent_dist.mean

        try:
            sec, peak = measure(run, device, 1, max(1, p["repeats"] // 2))
            rows.append(f"| {size}² | {p['vae_batch']} | {p['vae_batch'] / sec:.2f} | {peak:.1f} |")
        except torch.OutOfMemoryError:
            rows.append(f"| {size}² | {p['vae_batch']} | OOM | |")
        print(rows[-1], flush=True)
    return rows


QWEN25VL_7B = dict(  # Qwen2.5-VL-7B-Instruct's config.json sizes
    text=dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    ),
    vision=dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
    max_pixels=1003520,
    max_model_len=4096,  # per request: one image of <= 1280 visual tokens (1003520 px / 28²) + prompt + 200 new
    images=64,
    hf_batch=16,
    new_tokens=200,
)
QWEN2VL_SMOKE = dict(  # --smoke: the tests' tiny Qwen2-VL (demo/tiny_qwen2vl.py), built by its own builder
    max_pixels=tiny_qwen2vl.MAX_PIXELS,
    max_model_len=1024,  # the tiny model's max_position_embeddings: vLLM refuses a longer context
    images=8,
    hf_batch=4,
    new_tokens=8,
)


def build_qwen25vl(out: Path, q: dict, device) -> Path:
    """A random-weight Qwen2.5-VL of the given sizes with the tiny Qwen tokenizer (demo/tiny_qwen2vl.py)."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    tok, ids = tiny_qwen2vl.tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            **q["text"],
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=q["vision"],
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight[len(tok) :] = 0  # greedy then picks a token the tiny tokenizer can decode
    model.generation_config = GenerationConfig(eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=q["max_pixels"]).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": tiny_qwen2vl.CHAT_TEMPLATE}))
    del model
    return out


def caption_rows(smoke: bool, device) -> list[str]:
    """hf vs vllm captions/s on a random Qwen2.5-VL of 7B size (--smoke: the tiny Qwen2-VL of the tests)."""
    import tempfile

    from benchmarks.captioning import _batch, _images
    from captioning import hf, vllm_env
    from captioning.batch import CaptionerArgs

    q = QWEN2VL_SMOKE if smoke else QWEN25VL_7B
    n, new = q["images"], q["new_tokens"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if smoke:
            model = tiny_qwen2vl.build(Path(tmp) / "qwen2vl")
        else:
            model = build_qwen25vl(Path(tmp) / "qwen25vl", q, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        images = _images(n)
        cap = hf.HFCaptioner(
            CaptionerArgs(
                str(model),
                "Describe this image in detail.",
                dtype="bfloat16",
                max_new_tokens=new,
                generate={"min_new_tokens": new},
                max_pixels=q["max_pixels"],
            ),
            device=device.type,
        )
        cap(_batch(images[: q["hf_batch"]]))  # warm-up
        t = time.perf_counter()
        for i in range(0, n, q["hf_batch"]):
            cap(_batch(images[i : i + q["hf_batch"]]))
        rows.append(
            f"| hf (transformers generate, batch {q['hf_batch']}) | {n} | {new} | {n / (time.perf_counter() - t):.2f} |"
        )
        print(rows[-1], flush=True)
        del cap
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not vllm_env.ready():
            rows.append("| vllm | | | not run: no vLLM venv (captioning/vllm-env --kind cuda) |")
            return rows
        script = (
            "import json, sys, time\n"
            "from benchmarks.captioning import _batch, _images\n"
            "from captioning.batch import CaptionerArgs\n"
            "from captioning.vllm_engine import VLLMCaptioner\n"
            "if __name__ == '__main__':\n"
            "    model, n, new, mp, ctx = sys.argv[1], *map(int, sys.argv[2:6])\n"
            "    args = CaptionerArgs(model, 'Describe this image in detail.', dtype='bfloat16', max_new_tokens=new,\n"
            "                         generate={'ignore_eos': True}, max_pixels=mp)\n"
            "    cap = VLLMCaptioner(args, engine_kwargs={'max_model_len': ctx, 'gpu_memory_utilization': 0.85})\n"
            "    images = _images(n); cap(_batch(images[:8]))\n"
            "    t = time.perf_counter(); cap(_batch(images))\n"
            "    print('RESULT', n / (time.perf_counter() - t), flush=True)\n"
        )
        done = subprocess.run(
            [
                str(vllm_env.python()),
                "-c",
                script,
                str(model),
                str(n),
                str(new),
                str(q["max_pixels"]),
                str(q["max_model_len"]),
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT), "VLLM_CPU_KVCACHE_SPACE": "1"},
            capture_output=True,
            text=True,
        )
        found = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        rate = (
            f"{float(found[-1].split()[1]):.2f}"
            if found
            else f"failed: {(done.stderr.strip().splitlines() or ['?'])[-1][:120]}"
        )
        rows.append(f"| vllm (one engine call for all {n}) | {n} | {new} | {rate} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script runs")
    ap.add_argument("--captioning", action="store_true", help="only the hf vs vllm captioning row")
    ap.add_argument("--caption-toy", action="store_true", help="only the caption-mix toy (benchmarks/caption_toy.py)")
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu.md (gpu-captioning.md)")
    args = ap.parse_args()
    if args.caption_toy:
        from benchmarks import caption_toy

        command = caption_toy.GPU_COMMAND + (" --quick --device cpu" if args.smoke else "")
        print(command, flush=True)
        sys.exit(subprocess.call([sys.executable, *command.split()[1:]], cwd=ROOT))
    args.out = args.out or str(ROOT / "benchmarks" / "results" / ("gpu-captioning.md" if args.captioning else "gpu.md"))
    p = SMOKE if args.smoke else REAL
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("error: benchmarks/gpu.py needs a CUDA device (use --smoke to test it on CPU)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke run)"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    def autocast():
        return torch.autocast(device.type, dtype=dtype)

    t0 = time.time()
    head = [
        f"## GPU: {card}",
        "",
        f"torch {torch.__version__}; random weights; bf16. Command: "
        f"`python -m benchmarks.gpu{' --smoke' if args.smoke else ''}{' --captioning' if args.captioning else ''}`.",
        "",
    ]
    if args.captioning:
        text = (
            "\n".join(
                head
                + [
                    f"### Captioning: {'tiny Qwen2-VL' if args.smoke else 'Qwen2.5-VL-7B size'}, hf vs vllm backend",
                    "",
                    "| backend | images | new tokens each | captions/s |",
                    "|---|---|---|---|",
                    *caption_rows(args.smoke, device),
                ]
            )
            + f"\n\nTotal run time {time.time() - t0:.0f} s.\n"
        )
        print(text)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        return
    dit = [
        f"### DiT-{p['dit']} train step (bf16 autocast, AdamW step included; KV compression on blocks "
        f"{p['kv_layers'][0]}-{p['kv_layers'][-1]}, r = 2; caption 300 tokens, 200 valid)",
        "",
        "| bucket | tokens | batch | grad ckpt | KV | s/step | images/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|",
        *dit_rows(p, device, autocast),
    ]
    t5 = [
        "",
        f"### T5 encoder (t5-v1_1-xxl size: d_model {p['t5']['d_model']}, {p['t5']['num_layers']} layers), "
        "300-token limit, caption lengths 100-250",
        "",
        "| batches | batch | captions/s | peak GiB |",
        "|---|---|---|---|",
        *t5_rows(p, device, dtype),
    ]
    vae = [
        "",
        "### VAE encode (SDXL layout)",
        "",
        "| size | batch | images/s | peak GiB |",
        "|---|---|---|---|",
        *vae_rows(p, device, dtype),
    ]
    text = "\n".join(head + dit + t5 + vae) + f"\n\nTotal run time {time.time() - t0:.0f} s.\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
