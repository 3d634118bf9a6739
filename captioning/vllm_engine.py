"""The `vllm` backend: a vLLM engine inside each captioner actor, as a Ray batch -> batch callable.

Same contract as `hf` (captioning/batch.py): a batch of curated rows in, caption/status/reason out,
undecodable images fail alone, a failed generate fails its batch, the guard judges every caption.
The actor runs in vLLM's own venv (captioning/vllm_env.py, Ray `runtime_env.py_executable`): this
module imports only vllm, PIL, numpy and the project's light modules, never the main environment's
transformers. Images are decoded and downscaled here to the model's pixel budget (JPEG `draft`
decoding, encoders/vlm.py) before vLLM's processor sees them; the prompt goes through the model's
chat template by `LLM.chat` with the image as a PIL part.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from captioning.batch import CaptionerArgs, caption_batch

# Engine defaults the config can override (`engine_kwargs`): one image per prompt, fixed seed.
ENGINE_DEFAULTS = {"limit_mm_per_prompt": {"image": 1}, "seed": 0}


class VLLMCaptioner:
    """Ray Data callable: {"key", "image" (bytes), ...} -> the same rows plus caption/status/reason.

    `args.generate`: vllm.SamplingParams arguments (temperature, top_p, repetition_penalty, ...; greedy
    unless set); `args.max_new_tokens` is SamplingParams.max_tokens; `args.retry`: SamplingParams
    arguments for one more try at the guard's failures ({}: none). `engine_kwargs`: vllm.LLM arguments
    (max_model_len, gpu_memory_utilization, tensor_parallel_size, limit_mm_per_prompt, ...).
    """

    def __init__(self, args: CaptionerArgs, engine_kwargs: dict[str, Any] | None = None):
        from vllm import LLM

        self.llm = LLM(
            model=args.model,
            revision=args.revision,
            tokenizer_revision=args.revision,
            dtype=args.dtype,
            trust_remote_code=args.trust_remote_code,
            **{**ENGINE_DEFAULTS, **(engine_kwargs or {})},
        )
        self.prompt = args.prompt
        self.sampling = {"max_tokens": args.max_new_tokens, "temperature": 0.0, **args.generate}
        self.retry = dict(args.retry)
        self.guard = args.make_guard()
        self.target, self.max_pixels = image_budget(args.model, args.revision, args.trust_remote_code, args.max_pixels)

    def decode(self, data: bytes):
        """Encoded bytes -> an RGB PIL image no larger than the model's processor feeds it."""
        from encoders.vlm import decode_image

        return decode_image(data, self.target, self.max_pixels)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        again = (lambda images: self.caption(images, self.retry)) if self.retry else None
        return caption_batch(batch, self.decode, self.caption, self.guard, again)

    def caption(self, images: list, overrides: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
        """(caption, hit_limit) per PIL image: one `LLM.chat` call for the whole batch."""
        from vllm import SamplingParams

        params = SamplingParams(**{**self.sampling, **(overrides or {})})
        conversations = [
            [
                {
                    "role": "user",
                    "content": [{"type": "image_pil", "image_pil": image}, {"type": "text", "text": self.prompt}],
                }
            ]
            for image in images
        ]
        outs = self.llm.chat(conversations, params, use_tqdm=False)
        return [(o.outputs[0].text.strip(), o.outputs[0].finish_reason == "length") for o in outs]


def image_budget(
    model: str, revision: str | None, trust_remote_code: bool, max_pixels: int | None
) -> tuple[tuple[int, int] | None, int | None]:
    """(target size, pixel cap) for decode_image from the model's own image processor: a fixed-size
    processor's input size, an area-budgeted one's max pixels (the config's `max_pixels` wins)."""
    from transformers import AutoImageProcessor

    from encoders.vlm import pixel_budget, processor_input_size

    try:
        processor = AutoImageProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - none of its own (or remote code that needs more): decode up to max_pixels
        return None, max_pixels
    return processor_input_size(processor), max_pixels or pixel_budget(processor)
