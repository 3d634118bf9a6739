"""Turning one Ray batch of curated samples into caption rows: shared by every backend.

A sample whose bytes do not decode fails alone (`not_an_image`); an exception in generation fails
that batch's rows (`caption_error`) and the shard still completes. Every generated caption then
goes through the caption-quality guard (captioning/guard.py); with a `retry` generator the rows it
fails are generated once more (other sampling settings) and the second answer is judged instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from captioning.guard import Guard
from shards import reasons

# What a backend's generate returns per input: the text, or (text, hit_limit) where hit_limit says
# whether generation stopped at the token limit (None: the engine cannot tell).
Generated = str | tuple[str, bool | None]


@dataclass(frozen=True)
class CaptionerArgs:
    """What the model backends (`hf`, `vllm`) are built from: one list, filled by recaption.backend
    from the config; each backend adds only its own (`device`, `engine_kwargs`)."""

    model: str  # local folder or hub id
    prompt: str  # before the chat template
    revision: str | None = None
    dtype: str = "bfloat16"
    max_new_tokens: int = 300
    generate: dict[str, Any] = field(default_factory=dict)  # the engine's sampling arguments
    max_pixels: int | None = None  # None: the model's image processor decides
    trust_remote_code: bool = False
    guard: dict[str, Any] | None = None  # Guard(**guard); None: no guard
    retry: dict[str, Any] = field(default_factory=dict)  # sampling for one more try at the guard's failures

    def make_guard(self) -> Guard:
        return Guard(**(self.guard or {"enabled": False}))


def _split(out: Generated) -> tuple[str, bool | None]:
    return (out, None) if isinstance(out, str) else (out[0], out[1])


def caption_batch(
    batch: dict[str, np.ndarray],
    prepare: Callable[[bytes], Any],
    generate: Callable[[list], Sequence[Generated]],
    guard: Guard | None = None,
    retry: Callable[[list], Sequence[Generated]] | None = None,
) -> dict[str, np.ndarray]:
    """`prepare` decodes one image's bytes for the model; `generate` captions the prepared list.

    Adds `caption`, `status`, `reason`, and for the report `rejected` (what the model wrote for a
    row the guard failed, else "") and `retried` (the row was generated a second time).
    """
    guard = guard or Guard(enabled=False)
    n = len(batch["key"])
    captions, statuses, why = [""] * n, [reasons.KEPT] * n, [""] * n
    rejected, retried = [""] * n, [False] * n
    inputs, rows = [], []
    for i, data in enumerate(batch["image"]):
        try:
            inputs.append(prepare(bytes(data)))
            rows.append(i)
        except Exception:  # noqa: BLE001 - PIL raises many types for bad bytes; the row records it
            statuses[i], why[i] = reasons.FAILED, reasons.NOT_AN_IMAGE
    if rows:
        try:
            for i, out in zip(rows, generate(inputs)):
                captions[i], hit_limit = _split(out)
                verdict = guard.check(captions[i], hit_limit)
                if verdict.reason:
                    statuses[i], why[i], rejected[i] = reasons.FAILED, verdict.reason, captions[i]
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on one odd batch: fail its rows, keep the shard
            print(
                f"caption_error on keys {[batch['key'][i] for i in rows][:4]}: {type(e).__name__}: {e}", file=sys.stderr
            )
            for i in rows:
                statuses[i], why[i], rejected[i] = reasons.FAILED, reasons.CAPTION_ERROR, ""
        again = [(j, i) for j, i in enumerate(rows) if why[i] and why[i] != reasons.CAPTION_ERROR]
        if again and retry is not None:
            _retry(again, inputs, retry, guard, captions, statuses, why, rejected, retried, batch["key"])
    for i in range(n):
        if statuses[i] != reasons.KEPT:
            captions[i] = ""
    out = {k: v for k, v in batch.items() if k != "image"}
    out.update(
        caption=np.array(captions, dtype=object),
        status=np.array(statuses, dtype=object),
        reason=np.array(why, dtype=object),
        rejected=np.array(rejected, dtype=object),
        retried=np.array(retried, dtype=bool),
    )
    return out


def _retry(again, inputs, retry, guard, captions, statuses, why, rejected, retried, keys) -> None:
    """Generate the guard-failed rows once more; a caption that now passes replaces the failure."""
    try:
        outs = retry([inputs[j] for j, _ in again])
    except Exception as e:  # noqa: BLE001 - the retry is optional: the first verdicts stand
        print(f"guard retry failed on keys {[keys[i] for _, i in again][:4]}: {type(e).__name__}: {e}", file=sys.stderr)
        return
    for (_, i), out in zip(again, outs):
        retried[i] = True
        text, hit_limit = _split(out)
        verdict = guard.check(text, hit_limit)
        if verdict.reason:
            why[i], rejected[i] = verdict.reason, text
        else:
            captions[i], statuses[i], why[i], rejected[i] = text, reasons.KEPT, "", ""
