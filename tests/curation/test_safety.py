"""Optional safety heads (random weights in the real layouts) and the `nsfw` / `watermark` decisions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common import config
from curation import pipeline
from demo.images import encode, render
from encoders import safety
from shards import reasons
from shards.errors import SigmaError
from tests.curation import oracle

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """Stand-ins for LAION's weights (unreachable offline): same module layouts, random values."""
    d = tmp_path_factory.mktemp("safety")
    torch.manual_seed(0)
    nsfw = safety.NsfwHead()
    nsfw.norm.variance.fill_(2.0)
    torch.save(nsfw.state_dict(), d / "nsfw.pth")
    torch.save(safety.watermark_model().state_dict(), d / "watermark_model_v1.pt")
    return d


def test_embed_stage_with_safety_heads_and_their_reasons(heads, tiny_models, tmp_path):
    cfg = config.load(ROOT / "pipelines.yaml", "demo")
    embed = pipeline.Embed(
        vars(cfg.models.clip),
        cfg.models.aesthetic_head,
        {"nsfw_head": str(heads / "nsfw.pth"), "watermark": str(heads / "watermark_model_v1.pt")},
        cfg.curation,
    )
    images = [encode(render(i, 300, 200), "JPEG") for i in range(3)] + [b""]
    keys = [f"{i:010d}" for i in range(4)]
    batch = {"key": np.array(keys), "image": np.array(images, dtype=object)}
    out = embed(batch)
    assert "image" not in out and "clip_embedding" not in out
    for col in ("nsfw", "watermark"):
        assert ((out[col][:3] > 0) & (out[col][:3] < 1)).all() and np.isnan(out[col][3])
    assert [len(e) for e in out["embedding"]] == [768 * 2] * 3 + [0]  # float16 bytes, empty when no image
    assert list(out["reason"]) == [""] * 4  # thresholds off (the demo profile): nothing decided
    strict = config.load(
        ROOT / "pipelines.yaml", "demo", ["curation.watermark.enabled=true", "curation.watermark.threshold=0.0"]
    ).curation
    decided = pipeline.Embed(
        vars(cfg.models.clip),
        cfg.models.aesthetic_head,
        {"nsfw_head": None, "watermark": str(heads / "watermark_model_v1.pt")},
        strict,
    )({"key": np.array(keys), "image": np.array(images, dtype=object), "reason": np.array(["", "", "too_small", ""])})
    assert list(decided["reason"]) == ["watermark", "watermark", "too_small", ""]  # decided where scored, once

    rows = [
        {
            "key": k,
            "url": f"http://h/{k}",
            "reason": "",
            "width": 2048,
            "height": 2048,
            "tier": "2k",
            "ext": "jpg",
            "sharpness": 100.0,
            "contrast": 50.0,
            "brightness": 120.0,
            "sha256": k,
            "phash": None,
            "aesthetic": float(out["aesthetic"][i]),
            "nsfw": float(out["nsfw"][i]),
            "watermark": float(out["watermark"][i]),
            "src": "",
            "offset": 0,
            "size": 0,
            "embedding": out["embedding"][i],
            "t_measure": 0.0,
            "t_embed": 0.0,
        }
        for i, k in enumerate(keys[:3])
    ]
    pipeline.write_scored(tmp_path / "00000.parquet", rows)
    nsfw_t = float(np.sort(out["nsfw"][:3])[1])  # the middle score: splits the three
    cur = config.load(
        ROOT / "pipelines.yaml",
        "demo",
        [
            "curation.nsfw.enabled=true",
            f"curation.nsfw.threshold={nsfw_t}",
            "curation.watermark.enabled=true",
            "curation.watermark.threshold=0.0",
            "curation.dedup.enabled=false",
        ],
    ).curation
    decisions = oracle.decide(tmp_path, 1, cur)
    expected_nsfw = {k for k, v in zip(keys, out["nsfw"]) if v >= nsfw_t}
    assert {k for k, (r, _) in decisions.items() if r == reasons.NSFW} == expected_nsfw
    assert {k for k, (r, _) in decisions.items() if r == reasons.WATERMARK} == set(keys[:3]) - expected_nsfw
    off = config.load(ROOT / "pipelines.yaml", "demo", ["curation.dedup.enabled=false"]).curation
    assert oracle.decide(tmp_path, 1, off) == {}  # off by default: scores recorded, nothing dropped


def test_missing_safety_weights_named(tmp_path):
    with pytest.raises(SigmaError, match="models.nsfw_head"):
        safety.SafetyScorer(str(tmp_path / "nope.pth"), None)
