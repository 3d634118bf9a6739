"""A tiny random-weight Qwen2-VL, built offline, that both vLLM and transformers load.

The `vllm` captioning backend is tested and benchmarked on it against the `hf` backend: the same
folder, the same images. Qwen2-VL is the family of the shipped Qwen2.5-VL config (same processor
and chat layout), and vLLM's CPU build runs it. Layout:
2 text layers (hidden 128, 2 heads of 64, mrope sections [8, 12, 12]), a 1-layer vision tower
(patch 14, 2x2 merge), 56-112 px images (4-16 visual tokens), a byte-level BPE tokenizer trained
here on caption-like text plus Qwen's special tokens, and Qwen's chat template.

Usage: python -m demo.tiny_qwen2vl OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
# Qwen2-VL's chat layout (system turn left out): images as <|vision_start|><|image_pad|><|vision_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tokenizer(seed: int = 0):
    """(tokenizer, {special token: id}): byte-level BPE trained here, Qwen's specials and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from encoders.vlm import _corpus

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        _corpus(400, seed) + ["Describe this image in detail.", "user assistant system"],
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=SPECIALS,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIALS[1:],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )
    return tok, {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def build(out: str | Path, seed: int = 0) -> Path:
    """Write the model, tokenizer, image processor and chat template to `out` (fixed seed: same files)."""
    import torch
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = tokenizer(seed)
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6},
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=1,
            embed_dim=64,
            hidden_size=128,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|endoftext|>"]
    )
    model.save_pretrained(out)
    tok.save_pretrained(out)
    Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS).save_pretrained(out)
    (out / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (out / "README.txt").write_text(json.dumps({"what": "tiny random-weight Qwen2-VL for tests", "seed": seed}) + "\n")
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else ".cache/tiny/qwen2vl"))
