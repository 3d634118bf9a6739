"""Models given as bucket URLs (moto's S3 server on loopback): the tiny T5 and VAE, and a diffusers folder as
finetune's --init, copied once into the models cache (storage.cache.models) and loaded from there."""

from __future__ import annotations

import json
import re

import pytest
import torch

from common import config
from encoders import hub
from encoders import t5 as t5_mod
from encoders import vae as vae_mod
from shards import cache, storage
from shards.errors import SigmaError
from tests.training import encdata
from training import checkpoint, convert, finetune
from training.model import DiT_models


def _put(local, url: str) -> None:
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).put(str(local), url[5:], recursive=True)


@pytest.fixture
def models_cache(tmp_path):
    folder = tmp_path / "models"
    hub.configure(config.StorageConfig(cache=config.CacheConfig(models=str(folder))))
    yield folder
    hub.configure(config.StorageConfig())


def copies(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def test_t5_and_vae_from_a_bucket_load_from_one_copy(shard_models, bucket, models_cache, s3_counted):
    t5_url, vae_url = bucket + "/models/t5", bucket + "/models/vae"
    _put(shard_models["t5"], t5_url)
    _put(shard_models["vae"], vae_url)
    s3_counted.requests.clear()
    tok, enc = t5_mod.load_tokenizer(t5_url), t5_mod.load_t5(t5_url, "float32")
    want_tok, want_enc = t5_mod.load_tokenizer(str(shard_models["t5"])), t5_mod.load_t5(shard_models["t5"], "float32")
    ids = tok(["a red fox in the snow"], return_tensors="pt")
    assert ids["input_ids"].tolist() == want_tok(["a red fox in the snow"], return_tensors="pt")["input_ids"].tolist()
    assert torch.equal(enc(**ids).last_hidden_state, want_enc(**ids).last_hidden_state)
    assert vae_mod.read_config(vae_url) == vae_mod.read_config(str(shard_models["vae"]))
    vae, want = vae_mod.load_vae(vae_url).state_dict(), vae_mod.load_vae(str(shard_models["vae"])).state_dict()
    assert all(torch.equal(vae[k], want[k]) for k in want)
    assert len(copies(models_cache)) == 2  # one folder per model
    gets = s3_counted.count("GET", "/models/")
    assert gets >= len(list(shard_models["t5"].iterdir()))  # every file fetched once ...
    t5_mod.load_t5(t5_url, "float32")
    vae_mod.load_vae(vae_url)
    assert s3_counted.count("GET", "/models/") == gets  # ... and a second load fetches none (a listing only)


def test_a_half_copy_is_never_used_and_a_changed_model_is_copied_again(shard_models, bucket, models_cache, monkeypatch):
    url = bucket + "/models/vae"
    _put(shard_models["vae"], url)
    calls = []
    real = cache._download

    def dies_on_the_second_file(loc, dest):
        calls.append(loc)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-copy
        real(loc, dest)

    monkeypatch.setattr(cache, "_download", dies_on_the_second_file)
    with pytest.raises(KeyboardInterrupt):
        vae_mod.read_config(url)
    assert copies(models_cache) == [] and not [p for p in models_cache.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(cache, "_download", real)
    assert vae_mod.read_config(url)["latent_channels"] == 4
    [copy] = copies(models_cache)
    first = json.loads((models_cache / copy / cache.MANIFEST).read_text())

    changed = json.loads((shard_models["vae"] / "config.json").read_text())
    changed["force_upcast"] = not changed.get("force_upcast", True)
    storage.resolve(url + "/config.json").write_object(json.dumps(changed).encode())
    assert vae_mod.read_config(url)["force_upcast"] == changed["force_upcast"]
    assert json.loads((models_cache / copy / cache.MANIFEST).read_text()) != first


def test_a_missing_model_is_one_line(bucket, models_cache):
    for url, says in (
        (bucket + "/models/none", "not found"),
        ("s3://no-such-bucket-sigmaforge/t5", "does not exist"),
    ):
        with pytest.raises(SigmaError) as e:
            t5_mod.load_t5(url)
        message = str(e.value)
        assert message.startswith(f"models.t5: {url}") and says in message and "\n" not in message, message


def test_finetune_init_from_a_diffusers_folder_in_a_bucket(tmp_path, bucket, capsys):
    enc = encdata.write(tmp_path / "enc", "512", {(64, 64): 6})
    common = ("--set", "training.stages.512.parent=null", "--set", "training.checkpoint_every=2")
    finetune.main(encdata.args("512", enc, tmp_path / "first", *common, steps=2))
    run = tmp_path / "first" / "512"
    model_cfg = json.loads((run / "run.json").read_text())["model"]
    model = DiT_models[model_cfg.pop("size")](**model_cfg)
    convert.load_into(model, checkpoint.load_weights(checkpoint.latest(run) / checkpoint.MODEL))
    convert.save_diffusers(model, tmp_path / "pipe" / "transformer")
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    _put(tmp_path / "pipe", bucket + "/pipe")
    models = tmp_path / "models"
    capsys.readouterr()

    def losses(out, init):
        extra = ("--init", init, "--set", f"storage.cache.models={models}")
        finetune.main(encdata.args("512", enc, tmp_path / out, *common, *extra, steps=2))
        return [float(x) for x in re.findall(r"loss ([\d.]+)", (tmp_path / out / "512" / "log.txt").read_text())]

    from_bucket = losses("bucket", bucket + "/pipe")
    assert "initialised from " + str(models) in capsys.readouterr().out
    assert from_bucket == losses("disk", str(tmp_path / "pipe"))
    assert [p.name.endswith("-transformer") for p in models.iterdir() if not p.name.startswith(".")] == [True]
