"""Runs know every model they depend on (issue 21): the chain demo run -> training/export with no
profile -> diffusers generates; a config naming another T5 is refused in one line; the VAE-swap
stage samples with its own VAE; --init from a diffusers folder knows its position setup."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoders import t5 as t5_mod
from encoders import vae as vae_mod
from shards import encoded
from tests.training import encdata
from training import finetune, runs, sample

ROOT = Path(__file__).resolve().parents[2]


def as_encoded(encdir: Path, t5: Path, vae: Path) -> Path:
    """Give an encdata ENCDIR the models record encoding/encode writes into info.json."""
    info = encoded.read_info(encdir)
    info.update(encoded.model_facts("t5", str(t5)), t5_dtype="float32", **encoded.model_facts("vae", str(vae)))
    encoded.write_info(encdir, {k: v for k, v in info.items() if k != "format_version"})
    return encdir


def command(name: str, *args: str) -> subprocess.CompletedProcess:
    """training/<name> as the README runs it; no --profile unless `args` has one."""
    return subprocess.run(
        [sys.executable, str(ROOT / "training" / name), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_models):
    """A demo-profile 256 run, then the VAE-swap stage on latents of another VAE (its own `vae:`)."""
    root = tmp_path_factory.mktemp("chain")
    t5, vae = tiny_models / "t5", tiny_models / "vae"
    swap = vae_mod.build_tiny(root / "vae-swap", seed=1)  # same layout and scaling factor, other weights
    enc = {
        "256": as_encoded(encdata.write(root / "enc-256", "256", encdata.TIER_BUCKETS["256"]), t5, vae),
        "vae": as_encoded(encdata.write(root / "enc-vae", "256", encdata.TIER_BUCKETS["256"], seed=1), t5, swap),
    }
    out = root / "runs"
    grid = (
        "--set",
        "training.sample_every=1",
        "--set",
        "training.sample_steps=1",
        "--set",
        "training.sample_prompts=[a red fox]",
    )
    finetune.main(encdata.args("256", enc["256"], out, steps=1, batch=1))
    finetune.main(
        encdata.args("vae", enc["vae"], out, "--set", f"training.stages.vae.vae={swap}", *grid, steps=1, batch=1)
    )  # with a sample grid: T5 and VAE from the run's record
    return dict(root=root, t5=t5, vae=vae, swap=swap, enc=enc, run=out / "256", swap_run=out / "vae")


def test_run_json_records_the_datas_encoders(chain):
    record = json.loads((chain["run"] / runs.RUN_INFO).read_text())[runs.ENCODERS]
    assert record["t5"]["path"] == str(chain["t5"]) and record["t5"]["from"] == "data"
    assert record["t5"]["id"] == encoded.model_id(str(chain["t5"])) and record["t5"]["revision"] is None
    assert record["tokenizer"]["path"] == str(chain["t5"])
    assert record["vae"]["path"] == str(chain["vae"]) and record["max_length"] == 300
    null = chain["enc"]["256"] / "null_caption.safetensors"
    assert record["null_caption"]["sha256"] == hashlib.sha256(null.read_bytes()).hexdigest()
    swap = json.loads((chain["swap_run"] / runs.RUN_INFO).read_text())[runs.ENCODERS]
    assert swap["vae"]["path"] == str(chain["swap"]) and swap["vae"]["id"] != record["vae"]["id"]
    assert (chain["swap_run"] / "samples" / "step-0000001.png").is_file()


def test_export_without_profile_is_a_pipeline_that_generates(chain, tmp_path):
    from diffusers import PixArtSigmaPipeline

    out = tmp_path / "pipe"
    r = command("export", "--run", str(chain["run"]), "--diffusers", str(out))  # the default config: XL T5 on the hub
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: PixArtSigmaPipeline") and f"from {chain['t5']} (run.json)" in r.stdout
    assert "sample_size 32, interpolation_scale 0.5" in r.stdout
    assert json.loads((out / "text_encoder" / "config.json").read_text())["d_model"] == 32  # the tiny T5, not XXL
    pipe = PixArtSigmaPipeline.from_pretrained(str(out))
    img = pipe("a red fox", num_inference_steps=2).images[0]
    assert img.size == (256, 256) and len(set(img.tobytes())) > 1


def test_a_config_naming_another_t5_is_refused_in_one_line(chain, tmp_path):
    other = t5_mod.build_tiny(tmp_path / "t5-other", seed=1)  # same architecture, other weights
    base = ("--run", str(chain["run"]), "--diffusers", str(tmp_path / "out"), "--profile", "demo")
    r = command("export", *base, "--set", f"models.t5={other}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"models.t5 {other}" in r.stderr and f"trained with t5 {chain['t5']}" in r.stderr
    assert "--use-config-models" in r.stderr and not (tmp_path / "out").exists()
    r = command(
        "sample",
        "--run",
        str(chain["run"]),
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "x.png"),
        "--set",
        f"models.t5={other}",
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and f"models.t5 {other}" in r.stderr, r.stderr

    r = command("export", *base, "--set", f"models.t5={other}", "--use-config-models", "--dry-run")
    assert r.returncode == 0 and json.loads(r.stdout)["t5"] == str(other), r.stderr
    moved = shutil.copytree(chain["t5"], tmp_path / "moved" / "t5")  # the same files elsewhere: the same model
    r = command("export", *base, "--set", f"models.t5={moved}", "--dry-run")
    plan = json.loads(r.stdout)
    assert r.returncode == 0 and plan["t5"] == str(moved) and plan["models_from"] == "run.json", r.stderr
    r = command("export", *base, "--dry-run")  # the profile the run was trained with agrees
    assert json.loads(r.stdout)["t5"] == str(chain["t5"])


def test_the_vae_swap_stage_samples_with_its_own_vae(chain, tmp_path):
    run, png = chain["swap_run"], tmp_path / "fox.png"
    args = ("--run", str(run), "--prompt", "a red fox", "--size", "256x256", "--steps", "2", "--seed", "5")
    r = command("sample", *args, "--out", str(png), "--dry-run")  # no --profile: the config has no such VAE
    assert json.loads(r.stdout)["vae"] == str(chain["swap"]), r.stderr
    r = command("sample", *args, "--out", str(png))
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)

    model = runs.load_model(runs.find_run_checkpoint(run), "tiny", **runs.recorded(run)[1])
    gen = sample.Generator(model, str(chain["t5"]), str(chain["swap"]), keep_null=True)
    z = gen.latents(["a red fox"], 256, 256, steps=2, seed=5)  # [1, 4, 32, 32]
    by_swap = np.asarray(gen.decode(z)[0], dtype=np.int16)
    by_base = np.asarray(sample.Generator(None, str(chain["t5"]), str(chain["vae"])).decode(z)[0], dtype=np.int16)
    assert np.abs(got - by_swap).max() <= 1  # the same latents decoded by the stage's VAE
    assert np.abs(got - by_base).mean() > 5  # ... and not by models.vae


def test_init_from_a_diffusers_folder_knows_its_position_setup(chain, tmp_path, capsys):
    out = tmp_path / "pipe256"
    r = command("export", "--run", str(chain["run"]), "--diffusers", str(out), "--transformer-only")
    assert r.returncode == 0 and "transformer only" in r.stdout, r.stderr
    enc = chain["enc"]["256"]
    finetune.main(encdata.args("256", enc, tmp_path / "runs", "--init", str(out), "--dry-run"))
    captured = capsys.readouterr()
    plan = json.loads(captured.out)
    assert plan["init_trained_at"] == "256 px, pe_interpolation 0.5"  # the (demo) 256 stage's own setup
    assert "warning" not in captured.err
    finetune.main(encdata.args("1k", _enc_1k(chain["root"]), tmp_path / "runs", "--init", str(out), "--dry-run"))
    captured = capsys.readouterr()
    assert json.loads(captured.out)["init_trained_at"] == "256 px, pe_interpolation 0.5"
    assert "warning:" in captured.err and "--stage 256" in captured.err and "--stage 1k" not in captured.err


def _enc_1k(root: Path) -> Path:
    enc = root / "enc-1k"
    if not enc.exists():
        enc.mkdir()
        encdata.write(enc, "1k", encdata.TIER_BUCKETS["1k"])
    return enc


def test_a_hub_model_is_pinned_to_the_recorded_revision(tmp_path, monkeypatch, tiny_models):
    """A hub id resolves to the snapshot of the revision the data was encoded with (a real HF cache
    layout, read offline); a config whose id now resolves to another commit is refused."""
    from huggingface_hub import constants

    from common import config

    repo, first, second = "sigma-test/tiny-t5", "a" * 40, "b" * 40
    cache = tmp_path / "hub"
    for commit in (first, second):
        shutil.copytree(tiny_models / "t5", cache / "models--sigma-test--tiny-t5" / "snapshots" / commit)
    (cache / "models--sigma-test--tiny-t5" / "refs").mkdir()
    main = cache / "models--sigma-test--tiny-t5" / "refs" / "main"
    main.write_text(first)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert encoded.model_revision(repo) == first and encoded.model_revision(str(tiny_models / "t5")) is None

    enc = encdata.write(tmp_path / "enc", "256", {(256, 256): 1})
    as_encoded(enc, repo, tiny_models / "vae")
    run = tmp_path / "runs" / "256"
    run.mkdir(parents=True)
    record = runs.encoders_record(enc, "unused", "unused")
    assert record["t5"] == {"path": repo, "id": repo, "revision": first, "from": "data"}
    (run / runs.RUN_INFO).write_text(json.dumps({"stage": "256", runs.ENCODERS: record}))
    cfg = config.load(ROOT / "pipelines.yaml")
    main.write_text(second)  # the hub moved on since encoding
    models = runs.models_for(cfg, run, "256", named=set())
    assert models.t5 == str(cache / "models--sigma-test--tiny-t5" / "snapshots" / first)
    cfg.models.t5 = repo
    with pytest.raises(runs.SigmaError, match=f"models.t5 {repo}@{second}: .* trained with t5 {repo}@{first}"):
        runs.models_for(cfg, run, "256", named={"t5"})
    main.write_text(first)
    assert runs.models_for(cfg, run, "256", named={"t5"}).t5 == repo  # the same commit: the config's id is fine
