"""Any transformers image-text-to-text model, loaded once, generating for batches of prompts with images.

`AutoModelForImageTextToText` + `AutoProcessor` cover LLaVA-format models (an HF conversion of
ShareGPT4V-7B, JoyCaption), Qwen2.5-VL, InternVL3-hf and Florence-2-style models. A prompt goes
through the processor's chat template; batches are left-padded so every row's generation starts
at the same column. Images are decoded and downscaled where the model runs, to what the processor
will feed the model anyway (a 4K JPEG is decoded at reduced size with `draft`). Shared by the
captioning backend and the evaluation's VLM judge. `build_tiny` writes a random-weight LLaVA in
the same format for the demo and tests.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from encoders.dtypes import DTYPES

# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def decode_image(data: bytes, target: tuple[int, int] | None = None, max_pixels: int | None = None):
    """RGB PIL image from encoded bytes, no larger than needed. Raises on undecodable bytes.

    `target` (w, h) is the smallest size the processor still needs (it resizes down to it anyway);
    `max_pixels` caps the area (Qwen2.5-VL counts visual tokens by area: 4K would be ~10k tokens).
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    scale = _scale(img.size, target, max_pixels)
    if scale < 1.0 and img.format == "JPEG":
        img.draft("RGB", (int(img.width * scale) + 1, int(img.height * scale) + 1))  # DCT-domain downscale
    img = img.convert("RGB")  # forces the full decode: truncated bytes fail here
    scale = _scale(img.size, target, max_pixels)
    if scale < 1.0:
        w, h = round(img.width * scale), round(img.height * scale)
        if max_pixels is not None and w * h > max_pixels:  # rounding up must not break the cap
            w, h = int(img.width * scale), int(img.height * scale)
        img = img.resize((max(1, w), max(1, h)), Image.BICUBIC, reducing_gap=3.0)
    return img


def _scale(size: tuple[int, int], target: tuple[int, int] | None, max_pixels: int | None) -> float:
    """Largest downscale factor (<= 1) that keeps the image covering `target` and under `max_pixels`."""
    w, h = size
    scale = 1.0
    if target is not None:
        scale = min(scale, max(target[0] / w, target[1] / h))
    if max_pixels is not None and w * h > max_pixels:
        scale = min(scale, (max_pixels / (w * h)) ** 0.5)
    return scale


def processor_input_size(image_processor) -> tuple[int, int] | None:
    """The (w, h) a processor resizes to, when it has a fixed one; None for dynamic-resolution ones.

    CLIP-style processors resize the shortest edge then center-crop; SigLIP/Florence-style ones
    resize to height x width. Qwen2.5-VL-style ones (`max_pixels`) keep the aspect ratio and size
    the token grid by area, so they are capped by `max_pixels` instead.
    """
    size = getattr(image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {"shortest_edge": size}
    if pixel_budget(image_processor) is not None:
        return None
    if "shortest_edge" in size and isinstance(size["shortest_edge"], int) and size["shortest_edge"] < 4096:
        return size["shortest_edge"], size["shortest_edge"]
    if "height" in size and "width" in size:
        return size["width"], size["height"]
    return None


def pixel_budget(image_processor) -> int | None:
    """The most pixels a Qwen2-VL-style (area-budgeted) processor feeds the model; None for other processors.

    transformers 5 keeps the budget as size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    (pixel counts, not edges) on processors with a `merge_size`; older ones as `max_pixels`.
    """
    if image_processor is None:
        return None
    size = getattr(image_processor, "size", None) or {}
    size = dict(size) if not isinstance(size, int) else {}
    value = getattr(image_processor, "max_pixels", None) or size.get("max_pixels")
    if value is None and hasattr(image_processor, "merge_size") and "longest_edge" in size:
        value = size["longest_edge"]
    return int(value) if value else None


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VLM:
    """A processor + model pair on one device; `generate(texts, images)` is one batched call."""

    def __init__(
        self,
        model: str,
        revision: str | None = None,
        dtype: str = "bfloat16",
        max_new_tokens: int = 300,
        generate: dict[str, Any] | None = None,
        max_pixels: int | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        key: str = "model",
    ):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from encoders import hub

        hub.require(model, key, revision, what="vision-language model")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        extra = {"max_pixels": max_pixels} if max_pixels else {}
        self.processor = AutoProcessor.from_pretrained(
            model, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.padding_side = "left"  # decoder-only batches: every row generates from the same column
        self.model = (
            AutoModelForImageTextToText.from_pretrained(
                model,
                revision=revision,
                dtype=DTYPES[dtype],
                trust_remote_code=trust_remote_code,
            )
            .to(self.device)
            .eval()
        )
        self.max_pixels = max_pixels or pixel_budget(getattr(self.processor, "image_processor", None))
        self.generate_kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, **(generate or {})}
        self.target = processor_input_size(getattr(self.processor, "image_processor", None))
        self.eos_ids = _eos_ids(self.model)

    def decode(self, data: bytes):
        """Encoded bytes -> an RGB PIL image no larger than this processor needs."""
        return decode_image(data, self.target, self.max_pixels)

    def chat_text(self, content: list[dict], fallback: str) -> str:
        """One user turn (`content`: {"type": "image"} and {"type": "text", "text": ...} parts) through
        the chat template; `fallback` for task-token models without one (Florence-2: "<MORE_DETAILED_CAPTION>")."""
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return fallback

    def generate(self, texts: list[str], images: list) -> list[str]:
        """One answer per text; `images` are all rows' PIL images in order (as many per row as its text has)."""
        return [text for text, _ in self.generate_with_limit(texts, images)]

    @torch.inference_mode()
    def generate_with_limit(
        self, texts: list[str], images: list, overrides: dict[str, Any] | None = None
    ) -> list[tuple[str, bool]]:
        """(answer, hit_limit) per text: hit_limit is True when no end-of-sequence token came within
        `max_new_tokens` (the caption was cut). `overrides` replace generate() kwargs for this call."""
        inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device)
        inputs = {k: (v.to(self.model.dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
        kwargs = {**self.generate_kwargs, **(overrides or {})}
        out = self.model.generate(**inputs, **kwargs)  # [b, T_in + T_new] ([b, T_new] enc-dec)
        new = out if self.model.config.is_encoder_decoder else out[:, inputs["input_ids"].shape[1] :]  # [b, T_new]
        ended = (
            torch.isin(new, torch.tensor(sorted(self.eos_ids), device=new.device)).any(dim=1)
            if self.eos_ids
            else torch.zeros(len(new), dtype=torch.bool)
        )  # [b]
        hit = [(not bool(e)) and new.shape[1] >= kwargs["max_new_tokens"] for e in ended.tolist()]
        return [(t.strip(), h) for t, h in zip(self.processor.batch_decode(new, skip_special_tokens=True), hit)]


def _eos_ids(model) -> set[int]:
    """The token ids that end generation (generation_config.eos_token_id: an int or a list)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}


# ---------------------------------------------------------------------------------------------
# Tiny offline model (demo and tests)
# ---------------------------------------------------------------------------------------------

_WORDS = (
    "a an the this image shows picture of photo with red green blue white black small large old young "
    "bright dark wooden metal glass stone cat dog horse bird fox tree house car boat mountain river lake "
    "sky cloud sun moon street city field flower garden window door table chair book lamp painting "
    "close-up view on in under near and at by during sunset morning night winter summer snow rain light "
    "shadow colourful abstract composition detailed background foreground standing sitting running "
    "flying lying portrait landscape texture pattern there is are two three several people person "
    "woman man child grass water road building wall floor soft warm cool tones centre left right"
).split()

# LLaVA-1.5's chat layout ("USER: <image>\n... ASSISTANT:"), the one llava-hf checkpoints ship.
_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] if c['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for c in message['content'] if c['type'] == 'text' %}{{ c['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _corpus(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = list(_WORDS)
    return [" ".join(rng.choice(words, size=int(rng.integers(5, 20)))).capitalize() + "." for _ in range(n)]


def build_tiny(out: str | Path, seed: int = 0, vocab_size: int = 400) -> Path:
    """A random-weight LLaVA (32-d CLIP vision tower, 32 px, patch 8; 32-d Llama) + processor.

    Saved with `save_pretrained`; loads with `AutoModelForImageTextToText` / `AutoProcessor`. The
    tokenizer is a BPE trained offline on caption-like text, with `<image>` as a special token, a
    chat template and left padding. Fixed seed: the same files every time.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-()"),
    )
    raw.train_from_iterator(_corpus(400, seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
        model_max_length=512,
    )
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # vision_feature_select_strategy="default" drops CLS: 16 patch tokens per image, and the processor
    # must count the CLS it drops (num_additional_image_tokens=1) or it inserts one token too few.
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        chat_template=_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(out)

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    (out / "README.txt").write_text(json.dumps({"what": "tiny random-weight LLaVA for tests", "seed": seed}) + "\n")
    return out
