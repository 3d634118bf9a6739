"""The pass-through captioner (`backend: original`): each sample's own alt text becomes its caption.

For data whose captions are already good enough, or to encode and train before a VLM run: the shard's
`KEY.txt` (what curation kept as `original_caption`) is written as the caption, with no model, through
the same per-shard write, resume and fingerprint as every other backend. A sample without alt text
fails alone (`no_alt_text`); the image bytes are never decoded.
"""

from __future__ import annotations

import numpy as np

from shards import reasons


class OriginalCaptioner:
    """A Ray Data batch -> batch callable like the model backends; holds nothing."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t or "").strip() for t in batch["original_caption"]]
        out = {k: v for k, v in batch.items() if k != "image"}
        out.update(
            caption=np.array(texts, dtype=object),
            status=np.array([reasons.KEPT if t else reasons.FAILED for t in texts], dtype=object),
            reason=np.array(["" if t else reasons.NO_ALT_TEXT for t in texts], dtype=object),
        )
        return out
