"""training/sample: prompt -> PNG through the real entry point, tiny T5/VAE/DiT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.terminal import noise
from training.model import DiT_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_t5_vae(tiny_models):
    """The shared tiny T5 and VAE (tests/conftest.py builds them once)."""
    return tiny_models / "t5", tiny_models / "vae"


def sample(tiny_t5_vae, *args):
    t5_path, vae_path = tiny_t5_vae
    cmd = [
        sys.executable,
        str(ROOT / "training" / "sample"),
        "--profile",
        "demo",
        "--set",
        f"models.t5={t5_path}",
        "--set",
        f"models.vae={vae_path}",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.manual_seed(0)
    m = DiT_models["tiny"](kv_compress_layers=[2])  # KV compression samples fine (only export refuses it)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(m.state_dict(), str(path))
    return path


def test_sample_writes_a_png_of_the_requested_size_reproducibly(tmp_path, tiny_t5_vae, ckpt):
    outs = []
    for name, seed in (("a.png", "3"), ("b.png", "3")):
        r = sample(
            tiny_t5_vae,
            "--ckpt",
            str(ckpt),
            "--prompt",
            "A red fox in the snow.",
            "--size",
            "64x96",
            "--steps",
            "3",
            "--seed",
            seed,
            "--out",
            str(tmp_path / name),
        )
        assert r.returncode == 0, r.stderr
        assert not noise(r.stderr), noise(r.stderr)  # e.g. diffusers' "pip install accelerate" on the VAE load
        img = Image.open(tmp_path / name)
        assert img.size == (96, 64) and img.mode == "RGB"
        outs.append(img.tobytes())
    assert outs[0] == outs[1] and len(set(outs[0])) > 1  # same seed, same image; not a blank


def test_sample_dry_run_and_errors(tmp_path, tiny_t5_vae, ckpt):
    r = sample(tiny_t5_vae, "--ckpt", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "x.png"), "--dry-run")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["size"] == [1024, 1024] and plan["steps"] == 20 and plan["cfg"] == 4.5
    r = sample(tiny_t5_vae, "--ckpt", str(ckpt), "--prompt", "x", "--size", "60x64", "--out", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "multiples of 16" in r.stderr
    r = sample(
        tiny_t5_vae, "--ckpt", str(tmp_path / "none.safetensors"), "--prompt", "x", "--out", str(tmp_path / "x.png")
    )
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "size,steps,message",
    [
        ("0x0", "3", "size 0x0 (HxW): height and width must be in 16..8192"),
        ("48x40", "3", "size 48x40 (HxW): height and width must be multiples of 16"),
        ("64x99999", "3", "size 64x99999 (HxW)"),
        ("64x64", "0", "steps 0: must be at least 1"),
    ],
)
def test_size_and_steps_are_checked_before_any_model_loads(tmp_path, size, steps, message):
    # models that do not exist: the check must come first, in the flag's own H x W order
    cmd = [
        sys.executable,
        str(ROOT / "training" / "sample"),
        "--profile",
        "demo",
        "--set",
        "models.t5=/nonexistent",
        "--ckpt",
        str(tmp_path / "none.safetensors"),
        "--prompt",
        "x",
        "--size",
        size,
        "--steps",
        steps,
        "--out",
        str(tmp_path / "x.png"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_sample_takes_the_model_from_the_run(tmp_path, tiny_t5_vae, ckpt):
    run = tmp_path / "runs" / "mine"
    step = run / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(ckpt.read_bytes())
    model = {"size": "tiny", "input_size": 64, "pe_interpolation": 1.0, "multi_scale": False}
    (run / "run.json").write_text(json.dumps({"stage": "mine", "model": model}))
    t5_path, vae_path = tiny_t5_vae
    cmd = [
        sys.executable,
        str(ROOT / "training" / "sample"),
        "--set",
        f"models.t5={t5_path}",  # no --profile demo
        "--set",
        f"models.vae={vae_path}",
        "--run",
        str(run),
        "--prompt",
        "a fox",
        "--size",
        "512x512",
        "--out",
        str(tmp_path / "x.png"),
        "--dry-run",
    ]
    plan = json.loads(subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120).stdout)
    assert plan["dit"] == "tiny" and plan["input_size"] == 64 and plan["pe_interpolation"] == 1.0
    assert plan["multi_scale"] is False  # its own square size: the run's single-scale setup
