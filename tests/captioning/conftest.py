"""Fixtures for the captioning tests: the tiny captioner and T5, curated shards, a Share-Captioner stand-in.

The curated shards are real WebDataset tars in curation's layout (KEY.<jpg|png|webp>, KEY.json,
KEY.txt), built here so these tests do not depend on the curation code. The Share-Captioner folder
is a STAND-IN (tests/captioning/standin_share_captioner/): the real weights are not reachable here.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards import format as fmt

ROOT = Path(__file__).resolve().parents[2]
STANDIN_CODE = Path(__file__).resolve().parent / "standin_share_captioner"
NOT_AN_IMAGE = b"<html><body>404 served as a jpg</body></html>"


@pytest.fixture(scope="session")
def cap_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny LLaVA captioner and the tiny T5 (for token counts), built by the demo's builders."""
    from encoders import t5, vlm

    root = tmp_path_factory.mktemp("cap_models")
    return {"captioner": vlm.build_tiny(root / "captioner"), "t5": t5.build_tiny(root / "t5")}


def load_cfg(cap_models: dict, *overrides: str):
    from common import config

    return config.load(
        ROOT / "pipelines.yaml",
        "demo",
        [
            f"captioning.captioners.hf.model={cap_models['captioner']}",
            f"models.t5={cap_models['t5']}",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def cap_cfg(cap_models):
    return load_cfg(cap_models)


def image_bytes(width: int, height: int, seed: int, ext: str = "jpg") -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext])
    return buf.getvalue()


def write_shards(curdir: Path, n_shards: int, per_shard: int, corrupt: set[str] = frozenset()) -> list[Path]:
    """CURDIR/shards/NNNNN.tar with members sorted by key; keys in `corrupt` get non-image bytes."""
    out = []
    exts = ("jpg", "png", "webp")
    for s in range(n_shards):
        path = curdir / "shards" / fmt.shard_name(s)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key, ext = f"{s:05d}{i:04d}", exts[i % 3]
                data = NOT_AN_IMAGE if key in corrupt else image_bytes(40 + 7 * i, 30 + 5 * i, s * 100 + i, ext)
                meta = json.dumps({"key": key, "url": f"http://127.0.0.1/{key}.{ext}"}).encode()
                for name, payload in (
                    (f"{key}.{ext}", data),
                    (f"{key}.json", meta),
                    (f"{key}.txt", f"alt text {key}".encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        out.append(path)
    return out


@pytest.fixture(scope="session")
def standin_share_captioner(tmp_path_factory) -> Path:
    """A STAND-IN Share-Captioner folder: remote code with the real interface, tiny random weights.

    Tokenizer ids follow InternLM's: <unk>=0, <s>=1, </s>=2 (the script maps -1 to 2 = </s>).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("standin") / "ShareCaptioner-standin"
    out.mkdir()
    for f in STANDIN_CODE.glob("*.py"):
        shutil.copy(f, out / f.name)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<TOKENS_UNUSED_0>", "<TOKENS_UNUSED_1>"]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    raw.train_from_iterator(
        [
            "<|User|>: Analyze the image in a comprehensive and detailed manner.",
            "<|Bot|>: A red fox sits in the snow near a small wooden house at sunset.",
        ]
        * 4,
        trainers.BpeTrainer(vocab_size=120, special_tokens=specials),
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.save_pretrained(out)
    _save_for_transformers_431(out)
    (out / "config.json").write_text(
        json.dumps(
            {
                "model_type": "standin_share_captioner",
                "architectures": ["StandInShareCaptioner"],
                "auto_map": {
                    "AutoConfig": "configuration_standin.StandInShareCaptionerConfig",
                    "AutoModelForCausalLM": "modeling_standin.StandInShareCaptioner",
                },
                "text_config": {
                    "vocab_size": len(tok),
                    "hidden_size": 32,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 4,
                    "max_position_embeddings": 1024,
                    "bos_token_id": 1,
                    "eos_token_id": 2,
                    "pad_token_id": 3,
                },
            }
        )
    )
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    AutoModelForCausalLM.from_config(config, trust_remote_code=True).save_pretrained(out)
    return out


def _save_for_transformers_431(folder: Path) -> None:
    """Rewrite the saved tokenizer in the format tokenizers 0.13.3 (transformers 4.31.0) reads, which
    today's tokenizers reads too: the backend's own runtime_env loads this folder (test_share_captioner_env)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5 writes TokenizersBackend
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    spec = json.loads((folder / "tokenizer.json").read_text())
    for part in ("pre_tokenizer", "decoder"):  # prepend_scheme "always" == the old add_prefix_space
        spec[part] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    spec["model"].pop("ignore_merges", None)
    spec["model"]["merges"] = [" ".join(pair) for pair in spec["model"]["merges"]]  # old form: "a b"
    (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))


@pytest.fixture(scope="session")
def make_image():
    """image_bytes(width, height, seed, ext) -> encoded bytes (tests import no conftest under importlib mode)."""
    return image_bytes


@pytest.fixture(scope="session")
def make_shards():
    """write_shards(curdir, n_shards, per_shard, corrupt=set()) -> tar paths."""
    return write_shards


@pytest.fixture(scope="session")
def make_cfg(cap_models):
    """make_cfg(*overrides) -> the demo config on the tiny captioner and T5, plus `--set` style overrides."""
    return lambda *overrides: load_cfg(cap_models, *overrides)
