"""The caption-quality guard: after generation, reject text that is not a caption to train on.

Batch VLM captioning degenerates in a few known ways; each has a reason code (shards/reasons.py)
and a rule here, checked in this order (the first that fires names the row):

`empty_caption`, `refused_caption`, `wrong_language`, `degenerate_caption`, `truncated_caption`:
the rules, with their numbers, are the table in captioning/README.md ("Caption-quality guard").

Captions that pass are untouched. The rules are deliberately conservative: a dense caption with
quoted foreign text, numbers or non-ASCII names passes (tests/captioning/test_guard.py holds 50 such
captions). Failed rows keep `caption=""`; what the model wrote is kept for the report (`examples`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from shards import reasons

GUARD_REASONS = (
    reasons.EMPTY_CAPTION,
    reasons.REFUSED_CAPTION,
    reasons.WRONG_LANGUAGE,
    reasons.DEGENERATE_CAPTION,
    reasons.TRUNCATED_CAPTION,
)

# Each caption parquet keeps what the model wrote for its guard failures (caption="" in the rows) in
# its schema metadata, for the report: JSON [{key, reason, text}], at most this many per shard.
GUARD_EXAMPLES = b"sigmaforge.guard_examples"
GUARD_EXAMPLES_PER_SHARD = 20

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_REFUSAL_OPENING = re.compile(
    r"^\W*(?:i'?m\s+sorry|i\s+am\s+sorry|sorry,|i\s+apologi[sz]e|unfortunately,\s+i|"
    r"i\s+(?:cannot|can't|can\s+not|won't|will\s+not|am\s+unable|'m\s+unable|am\s+not\s+able|'m\s+not\s+able)|"
    r"as\s+an\s+ai\b|i\s+do\s+not\s+(?:feel\s+comfortable|have\s+the\s+ability)|"
    r"i'?m\s+not\s+(?:able|comfortable)|there\s+is\s+no\s+image|no\s+image\s+(?:was|is)\s+provided)",
    re.IGNORECASE,
)
_AS_AN_AI = re.compile(r"\bas\s+an\s+ai(?:\s+language)?\s+model\b", re.IGNORECASE)
_CHAR_LOOP = re.compile(r"(\S{1,12}?)\1{7,}")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_UNFINISHED_END = re.compile(
    r"(?:[,;:\-–—(\[{/&]|\b(?:a|an|the|and|or|but|of|with|in|on|at|to|from|by|for|"
    r"its|their|his|her|is|are|which|that|while|as)\b)\s*$",
    re.IGNORECASE,
)

_ENGLISH = frozenset("the a an of and in on with is are to at by from this that it its there".split())
_FOREIGN = (
    frozenset(
        (
            "le la les des du une et est dans avec sur der die das und ist mit ein eine einem "
            "auf el los las del y en con una es il gli della di che per o um uma com os não na no "
            "nel"
        ).split()
    )
    - _ENGLISH
)


@dataclass
class Verdict:
    reason: str  # "" when the caption passes
    detail: str = ""  # what fired, for the report


class Guard:
    """`check(text, hit_limit)` -> Verdict. `hit_limit`: True/False from the engine, None if unknown."""

    def __init__(
        self,
        enabled: bool = True,
        language: str | None = "en",
        min_words: int = 3,
        min_latin: float = 0.7,
        truncation: bool = True,
    ):
        self.enabled = enabled
        self.language = language
        self.min_words = min_words
        self.min_latin = min_latin
        self.truncation = truncation

    def check(self, text: str, hit_limit: bool | None = None) -> Verdict:
        if not self.enabled:
            return Verdict("")
        text = " ".join((text or "").split())
        words = [w.lower() for w in _WORD.findall(text)]
        if len(words) < self.min_words:
            return Verdict(reasons.EMPTY_CAPTION, f"{len(words)} words")
        m = _REFUSAL_OPENING.match(text) or _AS_AN_AI.search(text)
        if m:
            return Verdict(reasons.REFUSED_CAPTION, repr(m.group(0).strip()))
        if self.language == "en":
            why = wrong_language(text, words, self.min_latin)
            if why:
                return Verdict(reasons.WRONG_LANGUAGE, why)
        why = repetition(text, words)
        if why:
            return Verdict(reasons.DEGENERATE_CAPTION, why)
        if self.truncation:
            if hit_limit:
                return Verdict(reasons.TRUNCATED_CAPTION, "stopped at the token limit")
            if hit_limit is None and _UNFINISHED_END.search(text):
                return Verdict(reasons.TRUNCATED_CAPTION, f"ends mid-sentence: {text[-30:]!r}")
        return Verdict("")


def wrong_language(text: str, words: list[str], min_latin: float) -> str:
    """Why `text` is not English ("" if it is): mostly non-Latin letters, or foreign function words."""
    letters = [c for c in text if c.isalpha()]
    if len(letters) >= 10:
        latin = sum("LATIN" in unicodedata.name(c, "") for c in letters)
        if latin / len(letters) < min_latin:
            return f"{latin}/{len(letters)} letters Latin"
    if len(words) >= 8:
        english = sum(w in _ENGLISH for w in words)
        foreign = sum(w in _FOREIGN for w in words)
        if foreign >= 3 and foreign > english:
            return f"{foreign} foreign vs {english} English function words"
    return ""


def repetition(text: str, words: list[str]) -> str:
    """Why `text` is a repetition loop ("" if it is not)."""
    run = 1
    for i in range(1, len(words)):
        run = run + 1 if words[i] == words[i - 1] else 1
        if run >= 4:
            return f"word {words[i]!r} {run}x in a row"
    for n in range(2, 9):
        for i in range(0, len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return f"phrase {' '.join(words[i : i + n])!r} 3x in a row"
    seen: dict[str, int] = {}
    for sentence in _SENTENCE_END.split(text):
        key = " ".join(_WORD.findall(sentence.lower()))
        if not key:
            continue
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= 3 or (seen[key] == 2 and len(key.split()) >= 5):
            return f"sentence {key[:40]!r} repeated"
    m = _CHAR_LOOP.search(text)
    if m:
        return f"{m.group(1)!r} repeated {len(m.group(0)) // len(m.group(1))}x"
    if len(words) >= 40 and len(set(words)) / len(words) < 0.25:
        return f"{len(set(words))} distinct of {len(words)} words"
    return ""
