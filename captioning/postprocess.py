"""Caption clean-up every dense captioner needs, and the T5 token count against the budget.

Dense VLM captions open with boilerplate ("The image shows ...", "In this image, ...") that costs
T5 tokens and teaches the DiT nothing; PixArt-Sigma keeps 300 T5 tokens (`</s>` included), and
Share-Captioner averages ~826 characters (~170-220 tokens), so a tail of long captions is cut
at encode time: `finish_rows` counts them so the run can report how many.
"""

from __future__ import annotations

import re

from shards import reasons

# Only style-neutral nouns: "This painting depicts ..." keeps its opening, because "painting" is
# content the DiT should learn; "The image shows ..." carries nothing.
_NOUN = r"(?:image|picture|photo|photograph|scene|frame)"
_VERB = r"(?:shows|depicts|features|captures|displays|presents|portrays|showcases|illustrates|contains)"
_OPENINGS = [
    rf"(?:this is|here is|it is)\s+an?\s+{_NOUN}\s+of\s+",  # "This is an image of"
    rf"(?:in\s+)?(?:the|this)\s+{_NOUN}\s*,?\s+(?:we (?:can )?see|there (?:is|are))\s+",  # "In the picture, there are"
    rf"(?:the|this)\s+{_NOUN}\s+{_VERB}\s+",  # "The image shows"
    rf"(?:in|within)\s+(?:the|this)\s+{_NOUN}\s*,\s*",  # "In this image, "
]
_OPENING_RE = re.compile(r"^\s*(?:" + "|".join(_OPENINGS) + ")", re.IGNORECASE)


def collapse_whitespace(text: str) -> str:
    """One space between words: newlines and runs of spaces mean nothing to T5."""
    return " ".join(text.split())


def strip_opening(text: str) -> str:
    """Drop one boilerplate opening and capitalise what remains; unchanged if nothing matches.

    "The image shows a red fox in the snow." -> "A red fox in the snow."
    """
    m = _OPENING_RE.match(text)
    if not m or m.end() >= len(text):
        return text
    rest = text[m.end() :]
    return rest[:1].upper() + rest[1:]


def clean(text: str, strip_openings: bool) -> str:
    text = collapse_whitespace(text)
    return strip_opening(text) if strip_openings else text


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """T5 token counts, `</s>` included, untruncated (the same count the 300 budget is measured in);
    0 (not counted) without a tokenizer."""
    if tokenizer is None:
        return [0] * len(texts)
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def finish_rows(rows: list[dict], tokenizer, strip_openings: bool) -> list[dict]:
    """Clean kept captions in place, fail the empty ones, and fill `num_tokens` (0 for failed rows)."""
    for row in rows:
        if row["status"] == reasons.KEPT:
            row["caption"] = clean(row["caption"] or "", strip_openings)
            if not row["caption"]:
                row["status"], row["reason"] = reasons.FAILED, reasons.EMPTY_CAPTION
        row["num_tokens"] = 0
    kept = [row for row in rows if row["status"] == reasons.KEPT]
    for row, n in zip(kept, count_tokens(tokenizer, [row["caption"] for row in kept])):
        row["num_tokens"] = n
    return rows
