"""The DiT itself: sizes, shapes, masking, KV compression, single-scale, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from training.attention import SelfAttention
from training.model import DiT_models, PixArtSigma, sincos_pos_embed


def tiny(**kw) -> PixArtSigma:
    torch.manual_seed(0)
    m = DiT_models["tiny"](**{"input_size": 16, "pe_interpolation": 0.5, **kw})
    with torch.no_grad():  # the official init zeroes the output layers: randomise so outputs carry signal
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m.eval()


def inputs(n=2, h=16, w=16, length=300, channels=32, valid=(5, 9)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, h, w, generator=g)
    y = torch.randn(n, length, channels, generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, v in enumerate(valid[:n]):
        mask[i, :v] = True
    return x, torch.tensor([10, 900][:n]), y, mask


def test_xl2_reports_the_published_parameter_count():
    with torch.device("meta"):
        m = DiT_models["XL/2"]()
        kv = DiT_models["XL/2"](kv_compress_layers=range(14, 28))
    n = sum(p.numel() for p in m.parameters())
    assert round(n / 1e6, 1) == 610.9  # recipe.md: 610.9M
    assert round(sum(p.numel() for p in m.blocks[0].parameters()) / 1e6, 2) == 21.26
    assert sum(p.numel() for p in kv.parameters()) - n == 14 * 8064  # 8,064 per compressed layer
    assert (m.hidden_size, m.depth, m.num_heads, m.out_channels) == (1152, 28, 16, 8)


def test_named_sizes_build_with_overrides():
    for name in DiT_models:
        with torch.device("meta"):
            m = DiT_models[name](
                input_size=32,
                pe_interpolation=0.5,
                caption_channels=32,
                model_max_length=120,
                multi_scale=True,
                kv_compress_layers=[1],
            )
        assert m.y_embedding.shape == (120, 32) and m.kv_compress_layers == (1,)
    with pytest.raises(ValueError, match="out of range"):
        DiT_models["tiny"](kv_compress_layers=[4])


@pytest.mark.parametrize("hw", [(16, 16), (16, 24), (24, 8)])
def test_forward_shape_any_bucket(hw):
    m = tiny()
    x, t, y, mask = inputs(h=hw[0], w=hw[1])
    out = m(x, t, y, mask)
    assert out.shape == (2, 8, *hw) and torch.isfinite(out).all()


def test_padded_caption_tokens_are_never_attended():
    m = tiny(kv_compress_layers=[1, 2])
    x, t, y, mask = inputs(h=16, w=24)
    with torch.no_grad():
        a = m(x, t, y, mask)
        y2 = y.clone()
        y2[~mask] = torch.randn_like(y2[~mask]) * 50
        b = m(x, t, y2, mask)
        c = m(x, t, y[:, :9], mask[:, :9])  # same captions, trimmed padding
        y3 = y.clone()
        y3[0, 2] += 1.0  # a valid token does matter
        d = m(x, t, y3, mask)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)
    assert not torch.allclose(a[0], d[0], atol=1e-3) and torch.allclose(a[1], d[1], atol=1e-5)


def test_kv_compression_average_init_and_effect():
    attn = SelfAttention(16, 4, kv_compress_ratio=2)
    assert torch.all(attn.sr.weight == 0.25) and torch.all(attn.sr.bias == 0)
    tokens = torch.randn(1, 6 * 4, 16)  # a 6 x 4 grid (non-square)
    pooled = attn.sr(tokens.transpose(1, 2).reshape(1, 16, 6, 4))
    expected = torch.nn.functional.avg_pool2d(tokens.transpose(1, 2).reshape(1, 16, 6, 4), 2)
    assert torch.allclose(pooled, expected, atol=1e-6)
    assert attn.compress(tokens, (6, 4)).shape == (1, 6, 16)  # 4x fewer keys/values

    # Switching compression on: the uncompressed weights load (non-strictly) and leave the conv at its average.
    plain = tiny()
    comp = DiT_models["tiny"](input_size=16, pe_interpolation=0.5, kv_compress_layers=[0, 3]).eval()
    missing, unexpected = comp.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(
        f"blocks.{i}.attn.{n}" for i in (0, 3) for n in ("sr.weight", "sr.bias", "norm.weight", "norm.bias")
    )
    assert not unexpected and torch.all(comp.blocks[3].attn.sr.weight == 0.25)
    x, t, y, mask = inputs(h=16, w=24)
    with torch.no_grad():
        a, b = plain(x, t, y, mask), comp(x, t, y, mask)
    assert b.shape == a.shape and torch.isfinite(b).all() and not torch.allclose(a, b)


def test_caption_dropout_uses_the_null_caption_and_keeps_the_mask():
    m = tiny(class_dropout_prob=0.5)
    x, t, y, mask = inputs()
    null = torch.randn(300, 32)
    m.set_null_caption(null)
    with torch.no_grad():
        dropped = m(x, t, y, mask, force_drop_ids=torch.tensor([1, 0]))
        manual = m(x, t, torch.stack([null, y[1]]), mask)
    assert torch.allclose(dropped, manual, atol=1e-6)
    m.train()
    torch.manual_seed(3)
    with torch.no_grad():
        outs = {tuple(m(x[:1], t[:1], y[:1], mask[:1]).flatten()[:4].tolist()) for _ in range(12)}
    assert len(outs) == 2  # train mode: sometimes the caption, sometimes the null caption
    with pytest.raises(ValueError, match="padded to"):
        m(x, t, y[:, :10], mask[:, :10])
    with pytest.raises(ValueError, match="null caption must be"):
        m.set_null_caption(torch.zeros(120, 32))


def test_single_scale_equals_multi_scale_at_its_size_and_refuses_others():
    multi = tiny()
    single = DiT_models["tiny"](input_size=16, pe_interpolation=0.5, multi_scale=False).eval()
    single.load_state_dict(multi.state_dict())
    x, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.allclose(single(x, t, y, mask), multi(x, t, y, mask), atol=1e-6)
    with pytest.raises(ValueError, match="single-scale"):
        single(*inputs(h=16, w=24))


def test_position_grid_spans_the_512px_grid_at_every_stage():
    # 256 (latent 32, pe 0.5), 1024 (latent 128, pe 2) and a 2K bucket map onto the same [0, 32) grid
    e256 = sincos_pos_embed(64, 16, 16, base_size=16, pe_interpolation=0.5)
    e1k = sincos_pos_embed(64, 64, 64, base_size=64, pe_interpolation=2.0)
    assert torch.allclose(e256, e1k.reshape(64, 64, 64)[::4, ::4].reshape(256, 64), atol=1e-5)
    e = sincos_pos_embed(8, 2, 3, base_size=2, pe_interpolation=1.0).reshape(2, 3, 8)
    assert torch.allclose(e[0, :, :4], e[1, :, :4]) and not torch.allclose(e[:, 0, 4:][0], e[:, 0, 4:][1])


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, y, mask = inputs(h=8, w=16)
    grads = []
    for ckpt in (False, True):
        m = tiny(kv_compress_layers=[2])
        m.grad_checkpointing = ckpt
        m(x, t, y, mask).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
