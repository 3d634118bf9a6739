"""The `share-captioner` backend against the official batch recipe, on a STAND-IN model folder.

The real Share-Captioner weights are not reachable offline. `standin_share_captioner` is remote
code exposing the same interface (vis_processor, encode_img, encode_text, eoh, internlm_model.generate,
decode_text), loaded the same way (trust_remote_code from a folder), with tiny random weights.
"""

import numpy as np
import pytest
import torch

from captioning import recaption
from captioning.share_captioner import ShareCaptioner
from shards import reasons
from shards.errors import SigmaError

PROMPT = "Analyze the image in a comprehensive and detailed manner."
# share-cap_batch_infer.py, InternLM-XComposer projects/ShareGPT4V/tools (the script passes max_length=500,
# which with inputs_embeds only bounds the new tokens in transformers 4.31: max_new_tokens here).
RECIPE = dict(
    max_new_tokens=500,
    num_beams=3,
    min_length=1,
    do_sample=True,
    repetition_penalty=1.5,
    length_penalty=1.0,
    temperature=1.0,
    num_return_sequences=1,
)


def _share_cfg(cap_models, standin, *overrides):
    from pathlib import Path

    from common import config

    root = Path(__file__).resolve().parents[2]
    return config.load(
        root / "pipelines.yaml",
        "demo",
        [
            "captioning.captioner=share-captioner",
            f"captioning.captioners.share-captioner.model={standin}",
            "captioning.captioners.share-captioner.revision=null",  # the shipped revision is the hub repo's
            "captioning.captioners.share-captioner.runtime_env={}",
            f"models.t5={cap_models['t5']}",
            *overrides,
        ],
    )


def _share(cfg) -> ShareCaptioner:
    _, cap = recaption.select(cfg, None)
    cls, kwargs = recaption.backend(cap)
    assert cls is ShareCaptioner
    return cls(**kwargs)


@pytest.fixture(scope="module")
def share(cap_models, standin_share_captioner):
    """The backend as the config's `share-captioner` entry builds it (fp32 on CPU), 6 new tokens."""
    return _share(
        _share_cfg(
            cap_models,
            standin_share_captioner,
            "captioning.captioners.share-captioner.dtype=float32",
            "captioning.captioners.share-captioner.max_new_tokens=6",
        )
    )


def test_generate_kwargs_are_the_official_ones(cap_models, standin_share_captioner):
    share = _share(_share_cfg(cap_models, standin_share_captioner))  # the config as shipped: fp16, 500 tokens
    assert share.generate_kwargs == {**RECIPE, "eos_token_id": share.model.tokenizer.eos_token_id}
    assert share.model.tokenizer.eos_token_id == 2
    assert share.model.internlm_model.dtype == torch.float16  # the script's .half()


def test_prompt_assembly_matches_the_recipe(share, make_image):
    import io

    from PIL import Image

    model, tok = share.model, share.model.tokenizer
    data = [make_image(60, 40, 1), make_image(30, 90, 2, "png")]
    share({"key": np.array(["a", "b"], dtype=object), "image": np.array(data, dtype=object)})
    call = model.internlm_model.calls[-1]
    assert {k: v for k, v in call.items() if k != "inputs_embeds"} == {**RECIPE, "max_new_tokens": 6, "eos_token_id": 2}

    # Rebuilt by hand from the script: '<|User|>:' (with BOS) + image + prompt + eoh + '\n<|Bot|>:'
    ids1 = tok("<|User|>:", return_tensors="pt", add_special_tokens=True).input_ids
    ids2 = tok(f"{PROMPT}<TOKENS_UNUSED_0>\n<|Bot|>:", return_tensors="pt", add_special_tokens=False).input_ids
    assert ids1[0, 0] == tok.bos_token_id and ids2[0, 0] != tok.bos_token_id
    assert tok.convert_tokens_to_ids("<TOKENS_UNUSED_0>") in ids2[0].tolist()
    embed = model.internlm_model.model.embed_tokens
    with torch.no_grad():
        pixels = torch.stack([model.vis_processor(Image.open(io.BytesIO(d)).convert("RGB")) for d in data])
        expected = torch.cat([embed(ids1).repeat(2, 1, 1), model.encode_img(pixels), embed(ids2).repeat(2, 1, 1)], 1)
    assert pixels.shape == (2, 3, 224, 224)
    torch.testing.assert_close(call["inputs_embeds"], expected)


def test_minus_one_padding_is_decoded_as_eos(share, make_image):
    out = share(
        {
            "key": np.array(["a", "b", "c"], dtype=object),
            "image": np.array([make_image(50, 50, 3), b"not an image", make_image(80, 20, 4)], dtype=object),
        }
    )
    assert list(out["status"]) == [reasons.KEPT, reasons.FAILED, reasons.KEPT]
    assert out["reason"][1] == reasons.NOT_AN_IMAGE
    assert all(isinstance(c, str) for c in out["caption"])
    # The stand-in's generate() appends -1 to every row; decoded raw, -1 is not a token id at all.
    with pytest.raises(Exception):  # noqa: B017 - tokenizers raise differing types for an invalid id
        share.model.tokenizer.batch_decode([[5, -1]], skip_special_tokens=True)


def test_shipped_config_pins_the_remote_code_revision():
    """It runs remote code: the shipped entry names one hub commit, not a moving branch."""
    import re
    from pathlib import Path

    from common import config

    cap = config.load(Path(__file__).resolve().parents[2] / "pipelines.yaml", None, []).captioning.captioners[
        "share-captioner"
    ]
    assert cap.model == "Lin-Chen/ShareCaptioner" and cap.trust_remote_code
    assert re.fullmatch(r"[0-9a-f]{40}", cap.revision or ""), cap.revision
    assert recaption.captioner_id(cap) == f"Lin-Chen/ShareCaptioner@{cap.revision}"


def test_trust_remote_code_false_refuses_to_load(cap_models, standin_share_captioner):
    cfg = _share_cfg(
        cap_models, standin_share_captioner, "captioning.captioners.share-captioner.trust_remote_code=false"
    )
    with pytest.raises(SigmaError, match=r"captioners\.share-captioner\.trust_remote_code: .*explicit opt-in"):
        recaption.select(cfg, None)
    with pytest.raises(SigmaError, match="trust_remote_code"):
        ShareCaptioner(str(standin_share_captioner), PROMPT, trust_remote_code=False)


def test_share_captioner_backend_through_ray(ray_local, cap_models, standin_share_captioner, make_shards, tmp_path):
    import pyarrow.parquet as pq

    cfg = _share_cfg(
        cap_models,
        standin_share_captioner,
        "captioning.captioners.share-captioner.dtype=float32",
        "captioning.captioners.share-captioner.max_new_tokens=4",
        "captioning.captioners.share-captioner.resources={batch_size: 4, num_gpus: 0, num_cpus: 1, concurrency: 1}",
    )
    shards = make_shards(tmp_path / "cur", 1, 3, corrupt={"000000001"})
    summary = recaption.run(cfg, str(shards[0]), str(tmp_path / "caps"))
    rows = pq.read_table(tmp_path / "caps" / "00000.parquet").to_pylist()
    assert summary["written"] == 1 and len(rows) == 3
    assert rows[1]["reason"] == reasons.NOT_AN_IMAGE
    assert {r["captioner"] for r in rows} == {f"{standin_share_captioner}@local"}
    assert {r["prompt"] for r in rows} == {PROMPT}
