"""The `hf` backend: any transformers image-text-to-text model (encoders/vlm.py) as a Ray batch -> batch callable.

The driver never touches pixels: images are decoded and downscaled in the actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from captioning.batch import caption_batch
from captioning.guard import Guard
from encoders.vlm import VLM


class HFCaptioner(VLM):
    """Ray Data callable: {"key", "image" (bytes), ...} -> the same rows plus caption/status/reason.

    Loads the model once in __init__. Rows whose image does not decode, whose generation fails, or
    whose caption the guard rejects come back with status=failed and a reason code instead of raising.
    `retry`: generate() kwargs for one more try at the guard's failures ({}: none).
    """

    def __init__(
        self,
        model: str,
        prompt: str,
        revision: str | None = None,
        dtype: str = "bfloat16",
        max_new_tokens: int = 300,
        generate: dict[str, Any] | None = None,
        max_pixels: int | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
        guard: dict[str, Any] | None = None,
        retry: dict[str, Any] | None = None,
    ):
        super().__init__(model, revision, dtype, max_new_tokens, generate, max_pixels, trust_remote_code, device)
        self.prompt = prompt
        self.text = self.chat_text([{"type": "image"}, {"type": "text", "text": prompt}], prompt)
        self.guard = Guard(**(guard or {"enabled": False}))
        self.retry = dict(retry or {})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        again = (lambda images: self.caption(images, self.retry)) if self.retry else None
        return caption_batch(batch, self.decode, self.caption, self.guard, again)

    def caption(self, images: list, overrides: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
        """(caption, hit_limit) for PIL images, one batched generate call (left padded)."""
        return self.generate_with_limit([self.text] * len(images), images, overrides)
