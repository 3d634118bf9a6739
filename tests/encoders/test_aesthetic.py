"""The aesthetic scorer on the tiny open_clip model, and the LAION head's real state-dict format."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from demo.images import encode, render
from encoders import aesthetic
from shards.errors import SigmaError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    aesthetic.build_tiny(d / "clip", d / "aesthetic.pth")
    return d


def test_build_tiny_is_deterministic_and_in_real_formats(tiny, tmp_path):
    from safetensors.torch import load_file

    aesthetic.build_tiny(tmp_path / "clip", tmp_path / "aesthetic.pth")
    a, b = load_file(tiny / "clip" / "tiny-clip.safetensors"), load_file(tmp_path / "clip" / "tiny-clip.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = torch.load(tiny / "aesthetic.pth", weights_only=True)
    assert sorted(head) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert head["layers.0.weight"].shape == (1024, 768) and head["layers.7.weight"].shape == (1, 16)


def test_head_loads_a_laion_style_state_dict(tmp_path):
    """What `sac+logos+ava1-l14-linearMSE.pth` holds: a plain state dict saved with torch.save."""
    ref = aesthetic.AestheticHead()
    torch.save({k: v.clone() for k, v in ref.state_dict().items()}, tmp_path / "sac.pth")
    head = aesthetic.load_head(str(tmp_path / "sac.pth"))
    x = torch.nn.functional.normalize(torch.randn(3, 768), dim=-1)
    assert torch.allclose(head(x), ref.eval()(x))
    with pytest.raises(SigmaError, match="aesthetic_head"):
        aesthetic.load_head(str(tmp_path / "missing.pth"))


def test_scorer_batch(tiny):
    scorer = aesthetic.AestheticScorer(
        "tiny-clip",
        str(tiny / "clip" / "tiny-clip.safetensors"),
        str(tiny / "clip"),
        str(tiny / "aesthetic.pth"),
        device="cpu",
    )
    jpeg = encode(render(1, 320, 200), "JPEG")
    from PIL import Image

    batch = {
        "image": np.array([jpeg, b"", b"not an image", Image.open(io.BytesIO(jpeg))], dtype=object),
        "key": np.array(["a", "b", "c", "d"]),
    }
    out = scorer(batch)
    s, e = out["aesthetic"], out["clip_embedding"]
    assert s.shape == (4,) and e.shape == (4, 768)
    assert np.isfinite(s[[0, 3]]).all() and np.isnan(s[[1, 2]]).all()
    assert np.allclose(np.linalg.norm(e[[0, 3]], axis=1), 1, atol=1e-5) and not e[[1, 2]].any()
    assert s[0] == pytest.approx(s[3], abs=1e-5)  # bytes and PIL give the same score
    assert list(out["key"]) == ["a", "b", "c", "d"]  # other columns pass through
