"""T5 and VAE wrappers against the real library classes (tiny random-weight models built offline)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from encoders import t5, vae
from encoding import actors
from shards import encoded, reasons

CAPTIONS = [
    "a red fox in the snow",
    "a small wooden house near a lake at sunset with mountains behind it and a boat",
    "",
    "fox",
]


@pytest.fixture(scope="module")
def t5_pair(shard_models):
    return t5.load_tokenizer(shard_models["t5"]), t5.load_t5(shard_models["t5"], "float32")


def test_tiny_t5_layout(shard_models, t5_pair):
    tok, enc = t5_pair
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert 900 <= len(tok) <= 1000 and enc.config.vocab_size == len(tok)
    assert tok("a red fox").input_ids[-1] == tok.eos_token_id
    assert (shard_models["t5"] / "model.safetensors").exists()


@pytest.mark.parametrize("sort_by_length", [True, False])
def test_features_equal_t5_encoder_on_valid_tokens(t5_pair, sort_by_length):
    from transformers import T5EncoderModel

    tok, _ = t5_pair
    enc = T5EncoderModel.from_pretrained(tok.name_or_path).eval()  # the library class, loaded directly
    feats, lengths = t5.encode_captions(tok, enc, CAPTIONS, max_length=300, sort_by_length=sort_by_length, batch_size=3)
    for text, f, n in zip(CAPTIONS, feats, lengths):
        ids = tok(text, return_tensors="pt").input_ids  # unpadded: every token is valid
        with torch.no_grad():
            ref = enc(input_ids=ids).last_hidden_state[0]  # [n, C]
        assert f.shape == ref.shape == (n, enc.config.d_model)
        torch.testing.assert_close(f, ref, atol=1e-5, rtol=1e-4)


def test_truncation_to_max_length(t5_pair):
    tok, enc = t5_pair
    feats, lengths = t5.encode_captions(tok, enc, [" ".join(["fox"] * 50)], max_length=8)
    assert lengths == [8] and feats[0].shape[0] == 8


def test_null_caption_is_padded_empty_string(t5_pair):
    tok, enc = t5_pair
    y = t5.null_caption_embedding(tok, enc, max_length=300)
    assert y.shape == (300, enc.config.d_model) and y.dtype == torch.float32
    ids = tok([""], max_length=300, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        ref = enc(input_ids=ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state[0]
    torch.testing.assert_close(y, ref)


def test_preprocess_covers_and_center_crops():
    img = Image.fromarray(np.tile(np.arange(300, dtype=np.uint8)[None, :, None], (260, 1, 3)))  # w=300, h=260
    pixels, box = vae.preprocess(img, (240, 272))
    assert pixels.shape == (3, 240, 272) and pixels.min() >= -1 and pixels.max() <= 1
    assert vae.resized_size(260, 300, (240, 272)) == (240, 276)  # height fits, width overflows by 4
    assert box == (2, 0, 274, 240)
    wide, box = vae.resize_and_crop(Image.new("RGB", (1000, 250)), (176, 352))
    assert wide.size == (352, 176) and box[1] == 0 and box[0] == (704 - 352) // 2


def test_latent_mean_equals_autoencoderkl(shard_models):
    from diffusers import AutoencoderKL

    model = AutoencoderKL.from_pretrained(shard_models["vae"]).eval()
    assert model.config.scaling_factor == 0.13025 and len(model.config.block_out_channels) == 4
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (260, 300, 3), dtype=np.uint8))
    pixels, _ = vae.preprocess(img, (240, 272))
    mean, std = vae.encode_latent_dist(vae.load_vae(shard_models["vae"]), pixels[None])
    with torch.no_grad():
        ref = model.encode(pixels[None]).latent_dist
    assert mean.shape == (1, 4, 30, 34)  # x8 downsampling
    torch.testing.assert_close(mean, ref.mean)
    torch.testing.assert_close(std, ref.std)


def _batch(**cols):
    n = len(cols["key"])
    return {
        k: np.array(cols.get(k, [v] * n), dtype=object if isinstance(v, (bytes, str)) else np.int64)
        for k, v in actors.ROW.items()
    }


def test_vae_stage_marks_non_finite_as_failed(shard_models, tmp_path):
    """A VAE whose weights hold a NaN: every output is NaN, so every sample fails, nothing is stored."""
    from diffusers import AutoencoderKL

    broken = AutoencoderKL.from_pretrained(shard_models["vae"])
    with torch.no_grad():
        broken.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    broken.save_pretrained(tmp_path / "nan-vae")
    pixels = np.zeros((64, 64, 3), np.uint8).tobytes()
    batch = _batch(key=["a", "b"], bucket_h=[64, 64], bucket_w=[64, 64], pixels=[pixels, pixels])
    out = actors.VAEStage(str(tmp_path / "nan-vae"), "float32", False, False)(batch)
    assert list(out["status"]) == [reasons.FAILED] * 2 and list(out["reason"]) == [reasons.NON_FINITE] * 2
    assert list(out["vae"]) == [b"", b""]
    good = actors.VAEStage(str(shard_models["vae"]), "float32", False, False)(batch)
    assert list(good["status"]) == [reasons.KEPT] * 2
    assert encoded.unpack(good["vae"][0])["mean"].dtype == torch.float16


def test_t5_stage_stores_valid_tokens_fp16(shard_models):
    texts = [{"recaption": "a red fox", "original": "fox"}, {"recaption": "a dog on a table"}]
    batch = _batch(key=["a", "b"], captions=[json.dumps(t) for t in texts])
    out = actors.T5Stage(str(shard_models["t5"]), "float32", 300)(batch)
    a, b = encoded.unpack(out["t5"][0]), encoded.unpack(out["t5"][1])
    assert set(a) == {"recaption", "original"} and set(b) == {"recaption"}  # no original: none stored
    lens = json.loads(out["t5_lens"][0])
    assert a["recaption"].dtype == torch.float16 and a["recaption"].shape[0] == lens["recaption"]
    assert "original" not in json.loads(out["t5_lens"][1])


def test_lanczos_from_2k_buckets():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (2100, 80, 3), dtype=np.uint8))  # h=2100, w=80
    out, box = vae.resize_and_crop(img, (2048, 64))
    assert vae.resized_size(2100, 80, (2048, 64)) == (2048, 78) and box == (7, 0, 71, 2048)
    lanczos = img.resize((78, 2048), Image.LANCZOS).crop(box)
    assert np.array_equal(np.asarray(out), np.asarray(lanczos))
    assert not np.array_equal(np.asarray(out), np.asarray(img.resize((78, 2048), Image.BICUBIC).crop(box)))


def test_vae_tiling_option(shard_models):
    """Tiling (for 2K/4K on small GPUs) runs above the VAE's tile size and changes latents a little."""
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((384, 384), Image.BILINEAR)
    pixels, _ = vae.preprocess(img, (384, 384))
    whole, _ = vae.encode_latent_dist(vae.load_vae(shard_models["vae"]), pixels[None])
    tiled, _ = vae.encode_latent_dist(vae.load_vae(shard_models["vae"], tiling=True, slicing=True), pixels[None])
    assert tiled.shape == whole.shape == (1, 4, 48, 48) and torch.isfinite(tiled).all()
    assert not torch.equal(tiled, whole)  # the tiled path ran (tile size 256 < 384)
    assert torch.corrcoef(torch.stack([tiled.flatten(), whole.flatten()]))[0, 1] > 0.5


def test_the_encode_stages_preprocess_as_vae_preprocess():
    """preprocess (task) + the VAE stage's tensor are vae.preprocess, bit for bit: one implementation."""
    import io

    from PIL import Image

    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (300, 260, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    out = actors.preprocess(_batch(key=["k"], image=[buf.getvalue()]), "256", 10**8)
    bh, bw = int(out["bucket_h"][0]), int(out["bucket_w"][0])
    x = vae.to_pixels(np.frombuffer(out["pixels"][0], np.uint8).reshape(1, bh, bw, 3))  # as VAEStage builds it
    ref, box = vae.preprocess(vae.open_image(buf.getvalue()), (bh, bw))
    assert torch.equal(x[0], ref) and json.loads(out["crop"][0]) == list(box)


def test_tiny_t5_is_the_same_files_every_time(tmp_path):
    """Two builds give byte-identical tokenizer and weights (the demo's outputs compare across machines)."""
    a, b = t5.build_tiny(tmp_path / "a"), t5.build_tiny(tmp_path / "b")
    for name in ("tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    tok = t5.load_tokenizer(a)
    assert tok.unk_token_id not in tok("A red fox; 42 birds!").input_ids
