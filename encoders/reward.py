"""Reward models as scores of (image, prompt): HPSv2-style and PickScore-style, in their real formats.

HPSv2 is open_clip's ViT-H-14 fine-tuned on human preference pairs; its release is one torch file
(`HPS_v2.1_compressed.pt`, `{"state_dict": ...}`) that open_clip reads as the `pretrained` weights, so
it loads through the same `load_clip` as the CLIP and aesthetic scores. Score: cosine of the
L2-normalised image and text embeddings (HPSv2's own number, ~0.2-0.35 for real models).
PickScore is an HF `CLIPModel` (`yuvalkirstain/PickScore_v1`) with the ViT-H-14 `CLIPProcessor`;
score: `logit_scale.exp()` times that cosine (~18-23 for real models), as its model card computes it.
`build_tiny_hps` / `build_tiny_pickscore` write random-weight stand-ins in the same formats.
`__call__(images: [PIL], prompts: [str]) -> [N] float32` for both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from encoders.aesthetic import TINY_ARCH, load_clip
from shards.errors import SigmaError


def _cosine(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    img = img.float() / img.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    txt = txt.float() / txt.float().norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return (img * txt).sum(-1)  # [N]


class HPSScorer:
    """HPSv2: open_clip model + preference-tuned weights."""

    def __init__(self, arch: str, weights: str, config_dir: str | None = None, device: str = "cpu"):
        if not weights or not Path(weights).is_file():
            raise SigmaError(f"evaluation.rewards.hps_weights: file not found: {weights}")
        self.device = device
        self.model, self.preprocess, self.tokenizer = load_clip(
            arch, weights, config_dir, device, key="evaluation.rewards.hps_weights"
        )

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # [N, 3, s, s]
        img = self.model.encode_image(pixels)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device))
        return _cosine(img, txt).cpu().numpy().astype(np.float32)


class PickScorer:
    """PickScore: HF CLIPModel + CLIPProcessor."""

    def __init__(self, model: str, processor: str | None = None, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        from encoders import hub

        hub.require(model, "evaluation.rewards.pickscore", what="PickScore model")
        if processor:
            hub.require(processor, "evaluation.rewards.pickscore_processor", what="CLIP processor")
        self.device = device
        try:
            self.processor = CLIPProcessor.from_pretrained(processor or model)
            self.model = CLIPModel.from_pretrained(model).to(device).eval()
        except OSError as e:  # not found / not a CLIP folder: transformers says which file
            raise SigmaError(f"evaluation.rewards.pickscore: cannot load {model} ({str(e).splitlines()[0]})") from None

    @torch.no_grad()
    def __call__(self, images: list, prompts: list[str]) -> np.ndarray:
        inputs = self.processor(
            images=images, text=list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        ).to(self.device)
        out = self.model(**inputs)  # image_embeds [N, E], text_embeds [N, E]: projected
        return (
            (self.model.logit_scale.exp() * _cosine(out.image_embeds, out.text_embeds)).cpu().numpy().astype(np.float32)
        )


def load(rewards, device: str = "cpu") -> dict:
    """The configured scorers (`evaluation.rewards`) by score column: `hps`, `pickscore`."""
    from encoders import hub

    if rewards.pickscore:  # a hub id: checked before any model loads (the HPS file is checked by path)
        hub.require(rewards.pickscore, "evaluation.rewards.pickscore", what="PickScore model")
    out = {}
    if rewards.hps_weights:
        out["hps"] = HPSScorer(rewards.hps_arch, rewards.hps_weights, rewards.hps_config_dir, device)
    if rewards.pickscore:
        out["pickscore"] = PickScorer(rewards.pickscore, rewards.pickscore_processor, device)
    return out


# ---------------------------------------------------------------------------------------------
# Tiny offline stand-ins
# ---------------------------------------------------------------------------------------------


def build_tiny_hps(path: str | Path, config_dir: str | Path, seed: int = 2) -> Path:
    """A random tiny-clip (its config JSON is in `config_dir`, from `aesthetic.build_tiny`) saved as
    HPSv2 ships its weights: torch.save({"state_dict": ...})."""
    import open_clip

    open_clip.add_model_config(str(config_dir))
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_ARCH, pretrained=None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {k: v.contiguous().clone() for k, v in model.state_dict().items()}}, path)
    return path


def build_tiny_pickscore(out: str | Path, seed: int = 3) -> Path:
    """A random 32-d HF CLIPModel + CLIPProcessor (BPE tokenizer trained offline), save_pretrained."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizerFast,
        CLIPVisionConfig,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # CLIP's BPE (byte-level, "</w>" word ends), trained on a few prompt-like words: vocab + merges.
    raw = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    raw.normalizer = normalizers.Lowercase()
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words = (
        "a an the red fox snow lighthouse cliff sunset small cactus happy face photo painting of in on at "
        "with and image picture dog cat house tree sky blue green"
    ).split()
    corpus = [" ".join(np.random.default_rng(seed + i).choice(words, 8)) for i in range(200)]
    raw.train_from_iterator(
        corpus,
        trainer=trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|startoftext|>", "<|endoftext|>"],
            end_of_word_suffix="</w>",
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    bpe = json.loads(raw.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    tokenizer = CLIPTokenizerFast(vocab=bpe["vocab"], merges=merges, model_max_length=77)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ).to_dict(),
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ).to_dict(),
        projection_dim=32,
    )
    CLIPModel(config).eval().save_pretrained(out)
    (out / "README.txt").write_text(
        json.dumps({"what": "tiny random-weight PickScore-format CLIPModel", "seed": seed}) + "\n"
    )
    return out
