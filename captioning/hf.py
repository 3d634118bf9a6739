"""The `hf` backend: any transformers image-text-to-text model (encoders/vlm.py) as a Ray batch -> batch callable.

The driver never touches pixels: images are decoded and downscaled in the actor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from captioning.batch import CaptionerArgs, caption_batch
from encoders.vlm import VLM


class HFCaptioner(VLM):
    """Ray Data callable: {"key", "image" (bytes), ...} -> the same rows plus caption/status/reason.

    Loads the model once in __init__. Rows whose image does not decode, whose generation fails, or
    whose caption the guard rejects come back with status=failed and a reason code instead of raising.
    `args.generate`/`args.retry`: generate() kwargs (retry: one more try at the guard's failures; {}: none).
    """

    def __init__(self, args: CaptionerArgs, device: str | None = None):
        super().__init__(
            args.model,
            args.revision,
            args.dtype,
            args.max_new_tokens,
            args.generate,
            args.max_pixels,
            args.trust_remote_code,
            device,
        )
        self.prompt = args.prompt
        self.text = self.chat_text([{"type": "image"}, {"type": "text", "text": args.prompt}], args.prompt)
        self.guard = args.make_guard()
        self.retry = dict(args.retry)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        again = (lambda images: self.caption(images, self.retry)) if self.retry else None
        return caption_batch(batch, self.decode, self.caption, self.guard, again)

    def caption(self, images: list, overrides: dict[str, Any] | None = None) -> list[tuple[str, bool]]:
        """(caption, hit_limit) for PIL images, one batched generate call (left padded)."""
        return self.generate_with_limit([self.text] * len(images), images, overrides)
