"""HPSv2- and PickScore-style reward scorers in their real formats: save -> load -> the same scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from encoders import reward
from shards.errors import SigmaError


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(3)]


PROMPTS = ["A red fox in the snow.", "A lighthouse on a cliff at sunset.", "A small cactus with a happy face."]


def test_hps_saved_as_hpsv2_ships_it_loads_to_the_same_scores(tiny_models, demo_cfg, tmp_path):
    rw = demo_cfg.evaluation.rewards
    scorer = reward.HPSScorer(rw.hps_arch, rw.hps_weights, rw.hps_config_dir)
    before = scorer(_images(), PROMPTS)
    saved = tmp_path / "HPS_v2.1_compressed.pt"  # HPSv2's release format: {"state_dict": ...}, torch.save
    torch.save({"state_dict": scorer.model.state_dict()}, saved)
    assert set(torch.load(saved, weights_only=True)) == {"state_dict"}
    again = reward.HPSScorer(rw.hps_arch, str(saved), rw.hps_config_dir)(_images(), PROMPTS)
    np.testing.assert_allclose(again, before, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(before) <= 1) and len(set(before.round(6))) == 3  # a cosine, per image and prompt
    swapped = scorer(_images(), PROMPTS[::-1])
    assert not np.allclose(swapped, before)  # the prompt matters
    with pytest.raises(SigmaError, match="hps_weights: file not found"):
        reward.HPSScorer(rw.hps_arch, str(tmp_path / "missing.pt"), rw.hps_config_dir)


def test_pickscore_saved_with_save_pretrained_loads_to_the_same_scores(tiny_models, demo_cfg, tmp_path):
    from transformers import CLIPModel

    rw = demo_cfg.evaluation.rewards
    scorer = reward.PickScorer(rw.pickscore, rw.pickscore_processor)
    assert isinstance(scorer.model, CLIPModel)
    before = scorer(_images(), PROMPTS)
    scorer.model.save_pretrained(tmp_path / "model")
    scorer.processor.save_pretrained(tmp_path / "processor")
    again = reward.PickScorer(str(tmp_path / "model"), str(tmp_path / "processor"))(_images(), PROMPTS)
    np.testing.assert_allclose(again, before, rtol=1e-5, atol=1e-5)
    # PickScore = logit_scale.exp() * cosine of the projected embeddings, as its model card computes it
    inputs = scorer.processor(images=_images()[:1], text=PROMPTS[:1], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = scorer.model(**inputs)
    assert float(out.logits_per_image[0, 0]) == pytest.approx(float(before[0]), rel=1e-4)
    one = scorer(_images()[:1], PROMPTS[:1])  # batching (padding) does not change a score
    assert float(one[0]) == pytest.approx(float(before[0]), rel=1e-4, abs=1e-5)


def test_tiny_builders_are_deterministic(tiny_models, tmp_path):
    reward.build_tiny_pickscore(tmp_path / "ps")
    assert (tmp_path / "ps" / "model.safetensors").read_bytes() == (
        tiny_models / "pickscore" / "model.safetensors"
    ).read_bytes()
    reward.build_tiny_hps(tmp_path / "hps.pt", tiny_models / "clip")
    a = torch.load(tmp_path / "hps.pt", weights_only=True)["state_dict"]
    b = torch.load(tiny_models / "hps" / "hps-tiny.pt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_evaluation_scores_and_summarises_the_rewards(evaldir, demo_cfg):
    from evaluation import stats

    df = pd.read_parquet(evaldir / "scores.parquet")
    assert {"hps", "pickscore"} <= set(df.columns) and np.isfinite(df[["hps", "pickscore"]].to_numpy()).all()
    row = df.iloc[3]
    image = Image.open(evaldir / row.image).convert("RGB")
    rw = demo_cfg.evaluation.rewards
    assert reward.HPSScorer(rw.hps_arch, rw.hps_weights, rw.hps_config_dir)([image], [row.prompt])[0] == pytest.approx(
        row.hps, abs=1e-5
    )
    assert reward.PickScorer(rw.pickscore)([image], [row.prompt])[0] == pytest.approx(row.pickscore, abs=1e-4)
    summary = (evaldir / "summary.md").read_text()
    metrics_part = summary[summary.index("## Metrics") :]
    line = next(x for x in metrics_part.splitlines() if x.startswith("| 512 | "))
    assert f"{df[df.run == '512'].hps.mean():.3f}" in line and f"{df[df.run == '512'].pickscore.mean():.3f}" in line
    lo, hi = stats.bootstrap_ci(df[df.run == "512"].hps)
    assert f"[{lo:.3f}, {hi:.3f}]" in line
    tuned = next(x for x in summary.splitlines() if x.startswith("| tuned | 512 | 6 | "))  # paired to the first
    diff = (
        df[df.run == "tuned"].set_index(["prompt_idx", "seed"]).hps
        - df[df.run == "512"].set_index(["prompt_idx", "seed"]).hps
    )
    assert f"{diff.mean():.3f}" in tuned  # the paired difference to the first run
