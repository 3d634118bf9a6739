"""The T5 text encoder: loading (path or hub id), caption features, the null caption, a tiny offline model.

PixArt-Sigma conditions on `t5-v1_1-xxl` encoder features (4096-d) of up to 300 tokens. The
official extractor pads every caption to 300 and stores all 300 rows; the DiT masks the padding
out, so keeping only the valid rows (the caption's tokens + `</s>`) is lossless and a third the size for
a typical ~100-token caption. `encode_captions` returns exactly those rows.

Transformers keeps T5's `wo` projections in fp32 even when loading in fp16/bf16 (they overflow
in fp16); the rest runs in the requested dtype.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch

from encoders import hub
from encoders.dtypes import torch_dtype

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_tokenizer(path: str, key: str = "models.t5"):
    """The T5 tokenizer stored beside the encoder (a folder or a hub id; `key`: the setting that named it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hub.require(str(path), key, what="T5 tokenizer"))


def load_t5(
    path: str, dtype: str | torch.dtype = "bfloat16", device: str | torch.device = "cpu", key: str = "models.t5"
):
    """`T5EncoderModel` in eval mode, no grad; only the encoder half of the checkpoint is read."""
    from transformers import T5EncoderModel

    where = hub.require(str(path), key, what="T5 encoder")  # a bucket URL: its local copy
    dtype = torch_dtype(dtype)
    model = T5EncoderModel.from_pretrained(where, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_captions(
    tokenizer, encoder, captions: list[str], max_length: int = 300, sort_by_length: bool = True, batch_size: int = 32
) -> tuple[list[torch.Tensor], list[int]]:
    """T5 features of the valid tokens of each caption: ([n_i, C] float tensors, [n_i]).

    Captions are truncated to `max_length` tokens (including `</s>`), as the official extractor does.
    With `sort_by_length` the captions are batched in length order and each batch is padded only
    to its longest member (the padded rows are masked, so the valid rows do not change); otherwise
    every batch is padded to `max_length`, as PixArt's own extractor does.
    """
    device = next(encoder.parameters()).device
    ids = tokenizer(list(captions), max_length=max_length, truncation=True)["input_ids"]
    lengths = [len(i) for i in ids]
    order = sorted(range(len(ids)), key=lambda i: lengths[i]) if sort_by_length else list(range(len(ids)))
    out: list[torch.Tensor | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(lengths[i] for i in chunk) if sort_by_length else max_length
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)  # [b, T]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [b, T]
        for row, i in enumerate(chunk):
            input_ids[row, : lengths[i]] = torch.tensor(ids[i])
            mask[row, : lengths[i]] = 1
        hidden = encoder(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state  # [b, T, C]
        for row, i in enumerate(chunk):
            out[i] = hidden[row, : lengths[i]].float().cpu()  # [n_i, C]
    return out, lengths


@torch.no_grad()
def null_caption_embedding(tokenizer, encoder, max_length: int = 300) -> torch.Tensor:
    """T5 encoding of "" padded to `max_length`: [max_length, C] float32.

    PixArt's loader overwrites the DiT's `y_embedding` buffer with exactly this (all rows, padding
    included), and classifier-free guidance dropout swaps it in for the caption.
    """
    device = next(encoder.parameters()).device
    tok = tokenizer([""], max_length=max_length, padding="max_length", truncation=True, return_tensors="pt")
    hidden = encoder(input_ids=tok.input_ids.to(device), attention_mask=tok.attention_mask.to(device)).last_hidden_state
    return hidden[0].float().cpu()  # [max_length, C]


# ---------------------------------------------------------------------------------------------
# Tiny offline model (demo and tests)
# ---------------------------------------------------------------------------------------------

_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'-()"
_WORDS = (
    "a an the red green blue small large old young bright dark wooden metal glass stone cat dog horse bird "
    "fox tree house car boat mountain river lake sky cloud sun moon street city field flower garden window "
    "door table chair book lamp painting photo close-up view of on in under near with and at by during "
    "sunset morning night winter summer snow rain light shadow colourful abstract composition detailed "
    "background foreground standing sitting running flying lying a portrait landscape texture pattern"
).split()


def _sentences(n: int, seed: int) -> list[str]:
    """Caption-like sentences from a small word list plus made-up words (so the vocab fills up)."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvwz" for v in "aeiou"]
    coined = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(1500)]
    words = list(_WORDS) * 4 + coined
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 18))) for _ in range(n)]
    return [s.capitalize() + rng.choice(".!?,;") for s in sentences]


def _unigram_vocab(text: list[str], size: int) -> list[tuple[str, float]]:
    """A Unigram vocab counted in Python: every character (so nothing common is <unk>), then the most
    frequent words and word pieces, scored log(count / total). Not `UnigramTrainer`: its Rust hash
    maps make the vocab differ from run to run, and the tiny T5 must be the same files every time."""
    counts: dict[str, int] = {}
    for sentence in text + [" ".join(_CHARS)]:
        for word in sentence.split():
            word = "▁" + word
            for i in range(len(word)):
                for j in range(i + 1, min(len(word), i + 8) + 1):
                    counts[word[i:j]] = counts.get(word[i:j], 0) + 1
    chars = sorted({c for c in counts if len(c) == 1})
    pieces = sorted((p for p in counts if len(p) > 1), key=lambda p: (-counts[p] * len(p), p))
    chosen = chars + pieces[: size - 3 - len(chars)]
    total = sum(counts[p] for p in chosen)
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(p, math.log(counts[p] / total)) for p in chosen]


def build_tiny(out: str | Path, seed: int = 0, vocab_size: int = 1000) -> Path:
    """A tiny `T5EncoderModel` + T5 tokenizer (a Unigram vocab counted offline) saved with `save_pretrained`.

    Ids follow T5: `<pad>`=0, `</s>`=1, `<unk>`=2. Random weights, fixed seed: same files every time.
    """
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _unigram_vocab(_sentences(600, seed), vocab_size)
    tokenizer = T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    tokenizer.save_pretrained(out)

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(vocab),
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )  # gated-gelu: the t5-v1_1 layout
    T5EncoderModel(config).eval().save_pretrained(out)
    return out
