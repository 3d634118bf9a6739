"""Checkpoint compatibility: diffusers PixArtTransformer2DModel <-> ours (numerically), official .pth."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from shards.errors import SigmaError
from training import convert
from training.model import DiT_models


def random_tiny(**kw):
    torch.manual_seed(0)
    m = DiT_models["tiny"](**{"input_size": 16, "pe_interpolation": 0.5, **kw})
    with torch.no_grad():  # every weight random (the official init zeroes some, which would hide mistakes)
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def diffusers_twin(model):
    from diffusers import PixArtTransformer2DModel

    cfg = {k: v for k, v in convert.diffusers_config(model).items() if not k.startswith("_")}
    d = PixArtTransformer2DModel(**cfg).eval()
    d.load_state_dict(convert.to_diffusers(model.state_dict()), strict=True)
    return d


@pytest.fixture(scope="module")
def pair():
    ours = random_tiny()
    return ours, diffusers_twin(ours)


@pytest.mark.parametrize("hw,valid", [((16, 16), (300, 300)), ((16, 24), (7, 300)), ((32, 16), (1, 120))])
def test_forward_equals_diffusers(pair, hw, valid):
    ours, theirs = pair
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, *hw, generator=g)
    y = torch.randn(2, 300, 32, generator=g)
    mask = torch.zeros(2, 300, dtype=torch.bool)
    for i, v in enumerate(valid):
        mask[i, :v] = True
    t = torch.tensor([0, 999])
    with torch.no_grad():
        a = ours(x, t, y, mask)
        b = theirs(
            x, y, t, encoder_attention_mask=mask.long(), added_cond_kwargs={"resolution": None, "aspect_ratio": None}
        ).sample
    assert b.norm() > 1.0
    assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_round_trip_through_diffusers_is_exact(pair):
    ours, theirs = pair
    back = convert.from_diffusers(theirs.state_dict())
    sd = {k: v for k, v in ours.state_dict().items() if k != convert.NULL_CAPTION_KEY}
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    fresh = DiT_models["tiny"](input_size=16, pe_interpolation=0.5)
    convert.load_into(fresh, back)  # the null caption is the only key diffusers lacks


def test_export_config_states_sigma_settings(tmp_path):
    from diffusers import PixArtTransformer2DModel

    m = random_tiny(input_size=32, pe_interpolation=0.5)  # the 256 stage
    out = convert.save_diffusers(m, tmp_path / "transformer")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["use_additional_conditions"] is False and cfg["interpolation_scale"] == 0.5
    assert cfg["sample_size"] == 32
    loaded = PixArtTransformer2DModel.from_pretrained(str(out)).eval()
    x, y, t = torch.randn(1, 4, 32, 32), torch.randn(1, 300, 32), torch.tensor([500])
    with torch.no_grad():
        a = m(x, t, y)
        b = loaded(x, y, t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert ((a - b).norm() / b.norm()).item() <= 1e-5
    assert (
        convert.diffusers_config(DiT_models["tiny"](input_size=128, pe_interpolation=2.0))["interpolation_scale"] == 2.0
    )


def test_kv_compressed_model_is_refused_for_export(tmp_path):
    m = random_tiny(kv_compress_layers=[1, 3])
    with pytest.raises(SigmaError, match=r"blocks \[1, 3\] use KV compression"):
        convert.save_diffusers(m, tmp_path / "t")
    assert not (tmp_path / "t" / "config.json").exists()


def test_official_pth_loads_with_documented_mapping(tmp_path):
    """An official-style .pth: our names + the fixed pos_embed buffer, wrapped with optimizer state."""
    m = random_tiny(kv_compress_layers=[2])
    sd = dict(m.state_dict())
    sd["pos_embed"] = torch.zeros(1, 64, 64)
    torch.save({"state_dict": sd, "optimizer": {"state": {}}, "scheduler": {}, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = convert.load_checkpoint(tmp_path / "ckpt.pth")
    assert "pos_embed" not in loaded
    fresh = DiT_models["tiny"](input_size=16, pe_interpolation=0.5, kv_compress_layers=[2])
    fresh.load_state_dict(loaded, strict=True)
    arch = convert.infer_arch(loaded)
    assert arch == dict(
        hidden_size=64,
        in_channels=4,
        patch_size=2,
        depth=4,
        caption_channels=32,
        learn_sigma=True,
        mlp_ratio=4.0,
        kv_compress_layers=[2],
        kv_compress_ratio=2,
        model_max_length=300,
    )


def test_micro_conditions_and_pickled_objects_are_refused(tmp_path):
    with pytest.raises(SigmaError, match="PixArt-α"):
        convert.from_official({"csize_embedder.mlp.0.weight": torch.zeros(1)})

    class Payload:
        def __reduce__(self):
            return (print, ("executed!",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(SigmaError, match="weights_only"):
        convert.load_checkpoint(tmp_path / "evil.pth")


def test_load_checkpoint_reads_ours_and_diffusers_safetensors(tmp_path, pair):
    from safetensors.torch import save_file

    ours, theirs = pair
    save_file(ours.state_dict(), str(tmp_path / "ours.safetensors"))
    save_file(theirs.state_dict(), str(tmp_path / "theirs.safetensors"))
    a = convert.load_checkpoint(tmp_path / "ours.safetensors")
    b = convert.load_checkpoint(tmp_path / "theirs.safetensors")
    assert torch.equal(a["blocks.1.attn.qkv.weight"], b["blocks.1.attn.qkv.weight"])
    assert convert.NULL_CAPTION_KEY in a and convert.NULL_CAPTION_KEY not in b
