"""The `share-captioner` backend: Share-Captioner (`Lin-Chen/ShareCaptioner`) exactly as published.

This reproduces the official batch script (InternLM-XComposer,
`projects/ShareGPT4V/tools/share-cap_batch_infer.py`), which produced PixArt-Sigma's captions:

    embeds = ['<|User|>:' (with BOS)] + encode_img(vis_processor(image)) + [prompt + eoh + '\\n<|Bot|>:']
    internlm_model.generate(inputs_embeds=embeds, max_length=500, num_beams=3, min_length=1,
                            do_sample=True, repetition_penalty=1.5, length_penalty=1.0,
                            temperature=1.0, eos_token_id=tokenizer.eos_token_id, num_return_sequences=1)
    out[out == -1] = 2; decode_text([out])

in fp16 under autocast. With `inputs_embeds` only, transformers 4.31 starts `input_ids` empty
(shape [b, 0]), so the script's `max_length=500` bounds the *generated* tokens; we pass it as
`max_new_tokens=500` (config `max_new_tokens`), which is the same bound in 4.31 and stays so in
newer versions, where `max_length` would also count the prompt embeddings.
The model and its tokenizer are InternLM-XComposer v1 remote code that needs
`transformers==4.31.0`, so these actors run in their own Ray `runtime_env`; this module imports
nothing that needs a newer transformers. Images go through the model's own `vis_processor`
(bicubic 224 x 224, CLIP normalisation) in the actor, at full decoded size as the script does.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np
import torch

from captioning.batch import caption_batch
from captioning.guard import Guard
from encoders.dtypes import DTYPES
from shards.errors import SigmaError

USER, BOT = "<|User|>:", "\n<|Bot|>:"
EOS_FOR_PAD = 2  # the script maps -1 (beam-search padding in the remote code's generate) to </s> before decoding


def generate_kwargs(max_new_tokens: int, generate: dict[str, Any], eos_token_id: int) -> dict[str, Any]:
    """The official script's generate() arguments; the sampling/beam settings come from config."""
    return {"max_new_tokens": max_new_tokens, **generate, "eos_token_id": eos_token_id, "num_return_sequences": 1}


class ShareCaptioner:
    """Ray Data callable: {"key", "image" (bytes), ...} -> the same rows plus caption/status/reason."""

    def __init__(
        self,
        model: str,
        prompt: str,
        revision: str | None = None,
        dtype: str = "float16",
        max_new_tokens: int = 500,
        generate: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        guard: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
    ):
        if not trust_remote_code:
            raise SigmaError(
                f"{model}: Share-Captioner is remote code (InternLM-XComposer); set "
                "trust_remote_code: true for this captioner in the config to run it"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=True)
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=revision, trust_remote_code=True).eval()
        self.model = self.model.to(device=self.device, dtype=DTYPES[dtype])  # the script: .eval().half()
        self.model.tokenizer = tokenizer  # its encode_text/decode_text read the tokenizer from the model
        self.generate_kwargs = generate_kwargs(max_new_tokens, dict(generate or {}), tokenizer.eos_token_id)
        self.guard = Guard(**(guard or {"enabled": False}))
        self.retry = dict(retry or {})  # generate() kwargs for one more try at the guard's failures
        with torch.no_grad():
            self.seg_before = self.model.encode_text(USER, add_special_tokens=True)  # [1, t1, C]
            self.seg_after = self.model.encode_text(
                f"{prompt}{self.model.eoh}{BOT}", add_special_tokens=False
            )  # [1, t2, C]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        again = (lambda pixels: self.generate(torch.stack(pixels), self.retry)) if self.retry else None
        return caption_batch(
            batch,
            lambda data: self.model.vis_processor(_decode(data)),  # [3, 224, 224] each
            lambda pixels: self.generate(torch.stack(pixels)),
            self.guard,
            again,
        )

    def inputs_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """Prompt assembly of the official script: [USER seg, image tokens, prompt + eoh + BOT seg]."""
        b = pixels.shape[0]
        image = self.model.encode_img(pixels.to(self.device))  # [b, n_img, C]
        return torch.cat([self.seg_before.repeat(b, 1, 1), image, self.seg_after.repeat(b, 1, 1)], dim=1)  # [b, T, C]

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor, overrides: dict[str, Any] | None = None) -> list[str]:
        """Captions for a [b, 3, 224, 224] batch of `vis_processor` outputs (`overrides`: generate kwargs)."""
        autocast = torch.autocast("cuda") if self.device.startswith("cuda") else contextlib.nullcontext()
        with autocast:
            embeds = self.inputs_embeds(pixels)  # [b, T, C]
            out = self.model.internlm_model.generate(
                inputs_embeds=embeds, **{**self.generate_kwargs, **(overrides or {})}
            )  # [b, T_new]
        texts = []
        for ids in out:
            ids[ids == -1] = EOS_FOR_PAD
            texts.append(self.model.decode_text([ids]))
        return texts


def _decode(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
