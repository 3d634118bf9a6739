"""Turning one Ray batch of curated samples into caption rows: shared by every backend.

A sample whose bytes do not decode fails alone (`not_an_image`); an exception in generation fails
that batch's rows (`caption_error`) and the shard still completes.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

import numpy as np

from shards import reasons


def caption_batch(batch: dict[str, np.ndarray], prepare: Callable[[bytes], Any],
                  generate: Callable[[list], list[str]]) -> dict[str, np.ndarray]:
    """`prepare` decodes one image's bytes for the model; `generate` captions the prepared list."""
    n = len(batch["key"])
    captions, statuses, why = [""] * n, [reasons.KEPT] * n, [""] * n
    inputs, rows = [], []
    for i, data in enumerate(batch["image"]):
        try:
            inputs.append(prepare(bytes(data)))
            rows.append(i)
        except Exception:  # PIL raises many types for bad bytes; the row records it
            statuses[i], why[i] = reasons.FAILED, reasons.NOT_AN_IMAGE
    if rows:
        try:
            for i, text in zip(rows, generate(inputs)):
                captions[i] = text
        except Exception as e:  # e.g. out of memory on one odd batch: fail its rows, keep the shard
            print(f"caption_error on keys {[batch['key'][i] for i in rows][:4]}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            for i in rows:
                statuses[i], why[i] = reasons.FAILED, reasons.CAPTION_ERROR
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(caption=np.array(captions, dtype=object), status=np.array(statuses, dtype=object),
               reason=np.array(why, dtype=object))
    return out
