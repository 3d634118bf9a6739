"""training/export: a run's DiT -> a diffusers transformer that PixArtSigmaPipeline loads and runs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from training import checkpoint, runs
from training.model import DiT_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_t5_vae(tiny_models):
    """The shared tiny T5 and VAE (tests/conftest.py builds them once)."""
    return tiny_models / "t5", tiny_models / "vae"


def write_run(run: Path, **kw) -> Path:
    """A run folder as the trainer leaves it: weights in safetensors under a step folder."""
    torch.manual_seed(0)
    m = DiT_models["tiny"](input_size=32, pe_interpolation=0.5, multi_scale=False, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    step = checkpoint.step_dir(run, 10)
    step.mkdir(parents=True)
    save_file(m.state_dict(), str(step / checkpoint.MODEL))
    return run


def export(*args):
    return subprocess.run([sys.executable, str(ROOT / "training" / "export"), "--profile", "demo", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_export_loads_into_pixart_sigma_pipeline_and_matches_our_sampler(tmp_path, tiny_t5_vae):
    from diffusers import PixArtSigmaPipeline
    from transformers import T5EncoderModel

    from encoders import t5, vae
    from training.diffusion import make_scheduler
    from training.sample import Generator

    run = write_run(tmp_path / "runs" / "256")  # the 256 stage: single scale, pe_interpolation 0.5
    out = tmp_path / "export" / "transformer"
    r = export("--run", str(run), "--diffusers", str(out))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["use_additional_conditions"] is False and cfg["interpolation_scale"] == 0.5
    assert cfg["sample_size"] == 32 and cfg["caption_channels"] == 32

    from diffusers import PixArtTransformer2DModel

    t5_path, vae_path = tiny_t5_vae
    pipe = PixArtSigmaPipeline(tokenizer=t5.load_tokenizer(t5_path),
                               text_encoder=T5EncoderModel.from_pretrained(str(t5_path)).eval(),
                               vae=vae.load_vae(vae_path), transformer=PixArtTransformer2DModel.from_pretrained(str(out)),
                               scheduler=make_scheduler())
    prompt = "a small red house near the lake"  # lower case: the pipeline lower-cases prompts
    lat = pipe(prompt, height=64, width=96, num_inference_steps=4, guidance_scale=4.5, output_type="latent",
               use_resolution_binning=False, generator=torch.Generator().manual_seed(7)).images
    img = pipe(prompt, height=64, width=64, num_inference_steps=2, use_resolution_binning=False).images[0]
    assert img.size == (64, 64)

    ours = runs.load_model(runs.find_run_checkpoint(run), "tiny", input_size=32, pe_interpolation=0.5)
    gen = Generator(ours, str(t5_path), str(vae_path))
    mine = gen.latents([prompt], 64, 96, steps=4, cfg_scale=4.5, seed=7, uncond="diffusers")
    assert lat.shape == mine.shape == (1, 4, 8, 12)
    assert ((lat - mine).norm() / lat.norm()).item() < 1e-4


def test_kv_compressed_run_is_refused_with_a_clear_message(tmp_path):
    run = write_run(tmp_path / "runs" / "kv", kv_compress_layers=[1])
    r = export("--run", str(run), "--diffusers", str(tmp_path / "out"))
    assert r.returncode == 2 and "KV compression" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out" / "config.json").exists()


def test_dry_run_and_bad_arguments(tmp_path):
    run = write_run(tmp_path / "runs" / "2k")
    r = export("--run", str(run), "--diffusers", str(tmp_path / "out"), "--dry-run")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["input_size"] == 256 and plan["pe_interpolation"] == 4.0
    assert not (tmp_path / "out").exists()
    r = export("--run", str(tmp_path / "nope"), "--diffusers", str(tmp_path / "out"))
    assert r.returncode == 2 and "run folder not found" in r.stderr
    r = export("--ckpt", str(tmp_path / "x.pth"), "--diffusers", str(tmp_path / "out"), "--stage", "9k")
    assert r.returncode == 2 and "no such stage" in r.stderr
