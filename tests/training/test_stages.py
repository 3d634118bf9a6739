"""Stage resolution: the shipped chain, one-line errors, and loading a parent's weights across a switch."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import config
from shards.errors import SigmaError
from tests.training import encdata
from training import checkpoint, finetune, stages
from training.model import DiT_models

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cfg():
    return config.load(ROOT / "pipelines.yaml", "demo")


def test_shipped_stages_chain_as_in_the_paper(cfg):
    assert stages.chain(cfg, "kv") == ["256", "vae", "512", "1k", "2k", "4k", "kv"]
    kv = stages.resolve(cfg, "kv")
    kw = stages.model_kwargs(kv, latent_channels=4, caption_channels=32, max_length=300)
    assert kw["kv_compress_layers"] == (1,) and kw["input_size"] == 2880 // 8 and kw["pe_interpolation"] == 5.625
    real = config.load(ROOT / "pipelines.yaml")
    assert stages.resolve(real, "kv").kv_compress_layers == list(range(14, 28))
    assert [stages.resolve(real, s).pe_interpolation for s in ("256", "512", "1k", "2k")] == [0.5, 1.0, 2.0, 4.0]
    assert stages.resolve(real, "256").multi_scale is False


def test_bad_stage_names_and_chains_are_one_line_errors(cfg, tmp_path):
    with pytest.raises(SigmaError, match=r"--stage 8k: no such stage; choose one of \['1k', '256'"):
        stages.resolve(cfg, "8k")
    cyc = config.load(ROOT / "pipelines.yaml", "demo", ["training.stages.256.parent=kv"])
    with pytest.raises(SigmaError, match="parent cycle kv -> 4k -> 2k -> 1k -> 512 -> vae -> 256 -> kv"):
        stages.resolve(cyc, "kv")
    orphan = config.load(ROOT / "pipelines.yaml", "demo", ["training.stages.2k.parent=3k"])
    with pytest.raises(SigmaError, match="training.stages.2k.parent: no such stage '3k'"):
        stages.resolve(orphan, "2k")
    nokv = config.load(ROOT / "pipelines.yaml", "demo", ["training.stages.kv.kv_compress_layers=[]"])
    with pytest.raises(SigmaError, match="kv_compress is on but no layer is listed"):
        stages.resolve(nokv, "kv")


def test_missing_parent_run_is_a_one_line_error(cfg, tmp_path):
    c = config.load(ROOT / "pipelines.yaml", "demo", [f"training.out={tmp_path}"])
    with pytest.raises(SigmaError) as e:
        stages.init_source(c, "2k", None)
    assert str(e.value) == (
        f"--stage 2k: starts from its parent stage 1k, but {tmp_path / '1k'} has no checkpoint; "
        "run `training/finetune --stage 1k` first or pass --init"
    )
    assert stages.init_source(c, "256", None) is None  # a root stage without dit_weights: random init
    with pytest.raises(SigmaError, match="--init nowhere.safetensors: no such checkpoint"):
        stages.init_source(c, "2k", "nowhere.safetensors")


def test_entry_point_errors_are_one_line(tmp_path):
    enc = encdata.write(tmp_path / "enc", "512", {(64, 64): 2})
    r = subprocess.run(
        [sys.executable, "training/finetune", "--stage", "nope", "--profile", "demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.startswith("error: --stage nope: no such stage") and r.stderr.count("\n") == 1
    r = subprocess.run(
        [
            sys.executable,
            "training/finetune",
            "--stage",
            "512",
            "--data",
            str(enc),
            "--profile",
            "demo",
            "--set",
            f"training.out={tmp_path / 'runs'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "starts from its parent stage vae" in r.stderr and "training/finetune --stage vae" in r.stderr


def test_data_mismatches_are_caught_before_training(cfg, tmp_path):
    enc4 = encdata.write(tmp_path / "e1", "1k", {(64, 64): 2})
    args = argparse.Namespace(stage="512", data=str(enc4), out=str(tmp_path / "r"), init=None, max_steps=None)
    with pytest.raises(SigmaError, match="encoded at tier 1k, stage 512 trains on tier 512"):
        finetune.prepare(cfg, args)
    enc512 = encdata.write(tmp_path / "e0", "512", {(64, 64): 2})
    deep = config.load(
        ROOT / "pipelines.yaml",
        "demo",
        ["training.stages.512.kv_compress=true", "training.stages.512.kv_compress_layers=[9]"],
    )
    args.data = str(enc512)
    with pytest.raises(ValueError, match=r"kv_compress_layers \[9\] out of range for depth 4"):
        finetune.prepare(deep, args)
    enc_sq = encdata.write(tmp_path / "e2", "256", {(240, 272): 2})  # no 256x256 bucket
    args.stage, args.data = "256", str(enc_sq)
    cfg = config.load(ROOT / "pipelines.yaml", "demo", ["training.stages.256.multi_scale=false"])  # as in `real`
    with pytest.raises(SigmaError, match="single-scale .* needs the 256x256 bucket"):
        finetune.prepare(cfg, args)
    enc8 = encdata.write(tmp_path / "e3", "256", {(256, 256): 2}, latent_channels=8)
    args.data = str(enc8)
    with pytest.raises(SigmaError, match="8 channels; this model expects 0.13025 and 4"):
        finetune.prepare(cfg, args)


def _tiny(**kw):
    torch.manual_seed(0)
    return DiT_models["tiny"](input_size=8, **kw)


def test_switching_on_kv_compression_keeps_the_average_init():
    parent = _tiny()
    child = _tiny(kv_compress_layers=(1, 3), kv_compress_ratio=2)
    fresh = stages.load_init(child, parent.state_dict(), "parent")
    assert fresh == sorted(
        f"blocks.{i}.attn.{m}.{p}" for i in (1, 3) for m in ("norm", "sr") for p in ("bias", "weight")
    )
    assert torch.equal(child.blocks[1].attn.sr.weight, torch.full_like(child.blocks[1].attn.sr.weight, 0.25))
    assert torch.equal(child.blocks[1].attn.qkv.weight, parent.blocks[1].attn.qkv.weight)
    # the other way round (weights of compressed layers into a model without them) is refused
    with pytest.raises(SigmaError, match="KV-compression weights for layers this stage does not compress"):
        stages.load_init(_tiny(), child.state_dict(), "kvrun")


def test_latent_channel_and_size_mismatches_are_one_line_errors():
    eight = _tiny(in_channels=8).state_dict()
    with pytest.raises(SigmaError, match="weights take 8 latent channels, the data has 4"):
        stages.load_init(_tiny(), eight, "runs/vae/model.safetensors")
    wide = DiT_models["tiny"](input_size=8, hidden_size=128).state_dict()
    with pytest.raises(SigmaError, match="has shape"):
        stages.load_init(_tiny(), wide, "other")
    # the position embedding is recomputed, not loaded: a 256-stage state dict fits a 2K model as is
    single = _tiny(multi_scale=False, pe_interpolation=0.5)
    multi = DiT_models["tiny"](input_size=256, pe_interpolation=4.0)
    assert stages.load_init(multi, single.state_dict(), "256") == []
    assert "pos_embed" not in single.state_dict()


def test_checkpoint_of_a_run_is_what_init_reads(cfg, tmp_path):
    c = config.load(ROOT / "pipelines.yaml", "demo", [f"training.out={tmp_path}"])
    sd = _tiny().state_dict()
    checkpoint.save(tmp_path / "1k", 5, sd, None, {"optimizer": {}}, keep=2)
    src = stages.init_source(c, "2k", None)
    assert src == tmp_path / "1k" / "checkpoints" / "step-0000005" / "model.safetensors"
    assert stages.init_source(c, "kv", str(tmp_path / "1k")) == src  # --init RUNDIR: its newest checkpoint
    loaded = stages.read_weights(src)
    assert all(torch.equal(loaded[k], v) for k, v in sd.items())
