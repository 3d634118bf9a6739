"""training/export: a run -> a complete PixArtSigmaPipeline folder that loads and generates, for every stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.terminal import noise
from training import checkpoint, runs
from training.model import DiT_models

ROOT = Path(__file__).resolve().parents[2]
# the demo profile's stages: (nominal px, pe_interpolation, multi_scale) -> the sample_size the pipeline accepts
STAGES = {
    "256": (256, 0.5, False, 32),
    "1k": (1024, 2.0, True, 128),
    "2k": (2048, 4.0, True, 256),
    "4k": (2880, 5.625, True, 256),
}


@pytest.fixture(scope="module")
def tiny_t5_vae(tiny_models):
    """The shared tiny T5 and VAE (tests/conftest.py builds them once)."""
    return tiny_models / "t5", tiny_models / "vae"


def write_run(run: Path, stage: str = "256", record: bool = True, **kw) -> Path:
    """A run folder as the trainer leaves it: weights under a step folder, the model in run.json."""
    side, pe, multi, _ = STAGES[stage]
    model = dict(size="tiny", input_size=side // 8, pe_interpolation=pe, multi_scale=multi)
    torch.manual_seed(0)
    m = DiT_models["tiny"](**{k: v for k, v in model.items() if k != "size"}, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.05)
    step = checkpoint.step_dir(run, 10)
    step.mkdir(parents=True)
    save_file(m.state_dict(), str(step / checkpoint.MODEL))
    if record:
        (run / runs.RUN_INFO).write_text(json.dumps({"stage": stage, "model": model}))
    return run


def export(*args, profile=("--profile", "demo")):
    return subprocess.run(
        [sys.executable, str(ROOT / "training" / "export"), *profile, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_export_is_a_pipeline_that_generates_and_like_diffusers_matches_it(tmp_path, tiny_t5_vae):
    from diffusers import PixArtSigmaPipeline

    from training.sample import Generator

    t5_path, vae_path = tiny_t5_vae
    run = write_run(tmp_path / "runs" / "256")  # the 256 stage: single scale, pe_interpolation 0.5
    out = tmp_path / "export"
    r = export(
        "--run", str(run), "--diffusers", str(out), "--set", f"models.t5={t5_path}", "--set", f"models.vae={vae_path}"
    )
    assert r.returncode == 0, r.stderr
    assert not noise(r.stderr), noise(r.stderr)  # the VAE copy loads through encoders/vae.py: no accelerate hint
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["use_additional_conditions"] is False and cfg["interpolation_scale"] == 0.5
    assert cfg["sample_size"] == 32 and cfg["caption_channels"] == 32
    pipe = PixArtSigmaPipeline.from_pretrained(str(out))
    img = pipe("a red fox", num_inference_steps=2).images[0]  # every default: 256 px, resolution binning
    assert img.size == (256, 256) and len(set(img.tobytes())) > 1

    prompt = "  A Small RED House near the lake"  # the pipeline lower-cases and strips it
    lat = pipe(
        prompt,
        height=64,
        width=96,
        num_inference_steps=4,
        guidance_scale=4.5,
        output_type="latent",
        use_resolution_binning=False,
        generator=torch.Generator().manual_seed(7),
    ).images
    ours = runs.load_model(runs.find_run_checkpoint(run), "tiny", input_size=32, pe_interpolation=0.5)
    gen = Generator(ours, str(t5_path), str(vae_path))
    same = gen.latents([prompt], 64, 96, steps=4, cfg_scale=4.5, seed=7, like_diffusers=True)
    default = gen.latents([prompt], 64, 96, steps=4, cfg_scale=4.5, seed=7)
    assert lat.shape == same.shape == (1, 4, 8, 12)
    assert ((lat - same).norm() / lat.norm()).item() < 1e-4
    assert ((lat - default).norm() / lat.norm()).item() > 1e-3  # the two conventions do differ


def test_linked_encoders_load_and_force_leaves_their_targets(tmp_path, tiny_t5_vae):
    from diffusers import PixArtSigmaPipeline

    t5_path, vae_path = (shutil.copytree(p, tmp_path / "models" / p.name) for p in tiny_t5_vae)  # ours to lose
    originals = {f: f.read_bytes() for f in (tmp_path / "models").rglob("*") if f.is_file()}
    run = write_run(tmp_path / "runs" / "256")
    out = tmp_path / "export"
    args = (
        "--run",
        str(run),
        "--diffusers",
        str(out),
        "--encoders",
        "link",
        "--set",
        f"models.t5={t5_path}",
        "--set",
        f"models.vae={vae_path}",
    )
    r = export(*args)
    assert r.returncode == 0, r.stderr
    targets = {"text_encoder": t5_path, "tokenizer": t5_path, "vae": vae_path}
    assert {n: os.readlink(out / n) for n in targets} == {n: str(t.resolve()) for n, t in targets.items()}
    # OUT itself holds only the transformer's weights (os.walk does not descend into the links)
    held = sorted(str(Path(d, f).relative_to(out)) for d, _, files in os.walk(out) for f in files)
    weights = [f for f in held if f.endswith((".safetensors", ".bin"))]
    assert weights == ["transformer/diffusion_pytorch_model.safetensors"]
    img = PixArtSigmaPipeline.from_pretrained(str(out))("a red fox", num_inference_steps=2).images[0]
    assert img.size == (256, 256) and len(set(img.tobytes())) > 1

    r = export(*args, "--force")  # replaces OUT: unlinks the links, never deletes what they point to
    assert r.returncode == 0, r.stderr
    assert all((out / n).is_symlink() for n in targets)
    assert {f: f.read_bytes() for f in originals if f.exists()} == originals


def test_link_refuses_what_is_not_a_component_folder(tmp_path, tiny_t5_vae):
    t5_path, vae_path = tiny_t5_vae
    run = write_run(tmp_path / "runs" / "256")
    out = tmp_path / "export"
    r = export(
        "--run",
        str(run),
        "--diffusers",
        str(out),
        "--encoders",
        "link",
        "--set",
        f"models.vae={vae_path}",
        "--set",
        "models.t5=google/t5-v1_1-xxl",
    )  # a hub id
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "text_encoder google/t5-v1_1-xxl" in r.stderr and "use --encoders copy" in r.stderr
    pipeline = tmp_path / "pipeline"  # a whole pipeline folder: the VAE is in its vae/ subfolder
    shutil.copytree(vae_path, pipeline / "vae")
    r = export(
        "--run",
        str(run),
        "--diffusers",
        str(out),
        "--encoders",
        "link",
        "--set",
        f"models.t5={t5_path}",
        "--set",
        f"models.vae={pipeline}",
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"vae {pipeline} is not a local folder with config.json" in r.stderr and "--encoders copy" in r.stderr
    assert not out.exists() and not (tmp_path / "export.partial").exists()


@pytest.mark.parametrize(
    "stage", ["1k", pytest.param("2k", marks=pytest.mark.slow), pytest.param("4k", marks=pytest.mark.slow)]
)
def test_each_stage_export_runs_in_the_pipeline_with_identical_positions(tmp_path, tiny_t5_vae, stage):
    from diffusers import PixArtSigmaPipeline

    t5_path, vae_path = tiny_t5_vae
    run = write_run(tmp_path / stage, stage)
    out = tmp_path / "export"
    r = export(
        "--run", str(run), "--diffusers", str(out), "--set", f"models.t5={t5_path}", "--set", f"models.vae={vae_path}"
    )
    assert r.returncode == 0, r.stderr
    side, pe, _, sample_size = STAGES[stage]
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["sample_size"] == sample_size  # 4k: 256 (the pipeline has no 360 bins) ...
    assert cfg["interpolation_scale"] == pytest.approx(pe * (sample_size // 2) / (side // 16))  # ... same span
    pipe = PixArtSigmaPipeline.from_pretrained(str(out))
    # identical positions: the exported transformer and ours agree at a size neither was built for
    ours = runs.load_model(runs.find_run_checkpoint(run), "tiny", **{**runs.recorded(run)[1], "multi_scale": True})
    x, t, y = torch.randn(1, 4, 12, 20), torch.tensor([400]), torch.randn(1, 5, 32)
    with torch.no_grad():
        theirs = pipe.transformer(x, encoder_hidden_states=y, timestep=t, return_dict=False)[0]
        mine = ours(x, t, y, torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)
    # the pipeline's defaults: height/width from sample_size, resolution binning on (2k/4k: 2048 px, ~1 min of CPU)
    lat = pipe("a red fox", num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
    assert lat.shape == (1, 4, sample_size, sample_size) and torch.isfinite(lat).all()


def test_out_must_be_empty_unless_force_and_a_failed_export_leaves_nothing(tmp_path):
    run = write_run(tmp_path / "runs" / "256")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = export("--run", str(run), "--diffusers", str(out), "--transformer-only")
    assert r.returncode == 2 and "not empty; pass --force" in r.stderr and (out / "keep.txt").exists()
    r = export("--run", str(run), "--diffusers", str(out), "--transformer-only", "--force")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    kv = write_run(tmp_path / "runs" / "kv", kv_compress_layers=[1])
    r = export("--run", str(kv), "--diffusers", str(tmp_path / "kvout"))
    assert r.returncode == 2 and "KV compression" in r.stderr and "training/sample" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "kvout").exists() and not (tmp_path / "kvout.partial").exists()


def test_a_run_knows_its_model(tmp_path):
    run = write_run(tmp_path / "runs" / "256")
    # no --profile demo: models.dit is XL/2, but the run recorded the tiny model it trained
    r = export("--run", str(run), "--diffusers", str(tmp_path / "out"), "--transformer-only", profile=())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {tmp_path / 'out'}: transformer only from {runs.find_run_checkpoint(run)}")
    assert "sample_size 32, interpolation_scale 0.5 (256 px, pe_interpolation 0.5, single-scale, 4 layers)" in r.stdout
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_layers"] == 4
    # a checkpoint file inside the run counts as the run
    r = export("--ckpt", str(runs.find_run_checkpoint(run)), "--diffusers", str(tmp_path / "o2"), "--dry-run")
    plan = json.loads(r.stdout)
    assert plan["input_size"] == 32 and plan["pe_interpolation"] == 0.5 and plan["multi_scale"] is False
    r = export("--run", str(run), "--diffusers", str(tmp_path / "o3"), "--stage", "2k")
    assert r.returncode == 2 and "--stage 2k" in r.stderr and "256 px, pe_interpolation 0.5" in r.stderr


def test_bare_checkpoint_needs_its_stage(tmp_path):
    run = write_run(tmp_path / "runs" / "x", "4k", record=False)
    ckpt = runs.find_run_checkpoint(run)
    r = export("--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out"))
    assert r.returncode == 2 and "pass --stage" in r.stderr
    r = export("--ckpt", str(ckpt), "--diffusers", str(tmp_path / "out"), "--stage", "4k", "--transformer-only")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["sample_size"] == 256 and cfg["interpolation_scale"] == 4.0


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", "pickle", "truncated"])
def test_unreadable_safetensors_is_one_line(tmp_path, content):
    bad = tmp_path / "model.safetensors"
    if content == "pickle":
        torch.save({"x": torch.zeros(2)}, bad)
    elif content == "truncated":
        save_file({"x": torch.zeros(1000)}, str(bad))
        bad.write_bytes(bad.read_bytes()[:-100])
    else:
        bad.write_bytes(content)
    r = export("--ckpt", str(bad), "--diffusers", str(tmp_path / "out"), "--stage", "1k")
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert str(bad) in r.stderr and "not a readable .safetensors file" in r.stderr
    assert not (tmp_path / "out").exists()
