"""Caption sets at encode: which sets a run writes, the derived short set, adding sets to finished shards.

    --captions NAME=PATH      a set from a recaption CAPDIR or a caption table (bare PATH: NAME = recaption)
    --first-sentence NAME=SRC a derived set: the first sentence of set SRC's caption, encoded on its own
                              (T5 reads a caption whole: the first tokens of a long caption's features
                              are not the features of a short caption)
    original                  built in: the curated alt text (the caption row's original_caption, else KEY.txt)

A sample is encoded when at least one --captions set has a kept caption for it; otherwise it fails
with the reason of the first --captions set (missing_caption, caption_error, empty_caption). A set a
sample lacks is a null row of that set's side file (shards/encoded.py).

Adding sets later: every committed tar that lacks a set of this run (no side file; for a version 1
tar, recaption and original are inside it) gets the side file, from its row file's keys in order,
without reading an image or touching the tar or the other sets (`add_tasks`, `read_for_sets`, then
the T5 actors and the driver's `SetFiles`; the read task is encoding/actors.py `read_for_sets`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from shards import encoded, reasons
from shards.errors import SigmaError

_SENTENCE = re.compile(r"^(.+?[.!?])(?=\s|$)", re.S)


@dataclass
class SetPlan:
    """The sets of one run: named caption sources (in the order given), derived sets, `original`."""

    sources: dict[str, str] = field(default_factory=dict)  # name -> --captions PATH, as typed
    derived: dict[str, str] = field(default_factory=dict)  # name -> the set it takes the first sentence of

    @property
    def names(self) -> list[str]:
        """Every set this run writes, in a fixed order: the named sources, original, the derived sets."""
        return [*self.sources, encoded.ORIGINAL, *self.derived]


def parse(captions: list[str], first_sentence: list[str] | None = None) -> SetPlan:
    """--captions [NAME=]PATH ... and --first-sentence NAME=SRC ... -> SetPlan; one-line errors for a name
    given twice, a name that is not [a-z0-9_]+, `original` (built in), a derived set of an unknown set."""
    plan = SetPlan()
    for spec in captions:
        name, sep, path = spec.partition("=")
        if not sep or not encoded.SET_NAME.fullmatch(name):  # a bare PATH (which may contain "=")
            name, path = encoded.RECAPTION, spec
        _new_name(plan, name, "--captions")
        if name == encoded.ORIGINAL:
            raise SigmaError(
                "--captions original=...: `original` is the built-in set of the curated alt texts; name yours otherwise"
            )
        if not path:
            raise SigmaError(f"--captions {spec}: no PATH after {name}=")
        plan.sources[name] = path
    for spec in first_sentence or []:
        name, sep, src = spec.partition("=")
        if not sep:
            raise SigmaError(f"--first-sentence {spec}: expected NAME=SET (e.g. short=recaption)")
        encoded.check_set_name(name, "--first-sentence")
        _new_name(plan, name, "--first-sentence")
        if src not in plan.sources and src != encoded.ORIGINAL:
            known = ", ".join([*plan.sources, encoded.ORIGINAL])
            raise SigmaError(f"--first-sentence {spec}: no set {src!r} in this run (its sets: {known})")
        plan.derived[name] = src
    if not plan.sources:
        raise SigmaError("--captions: give at least one caption source (a recaption folder or a caption table)")
    return plan


def _new_name(plan: SetPlan, name: str, flag: str) -> None:
    if name in plan.sources or name in plan.derived or (name == encoded.ORIGINAL and flag != "--captions"):
        raise SigmaError(f"{flag} {name}=...: the caption set {name!r} is given twice; give each set one source")


def first_sentence(text: str) -> str:
    """The caption up to its first `.`, `!` or `?` followed by a space or the end (the whole caption if
    none): "A red fox. It sits in snow." -> "A red fox."."""
    m = _SENTENCE.match(text.strip())
    return m.group(1).strip() if m else text.strip()


# ---------------------------------------------------------------------------------------------
# One sample's captions (the read task)
# ---------------------------------------------------------------------------------------------


def sample_captions(
    rows: dict[str, dict[str, Any] | None], alt_text: str, derived: dict[str, str]
) -> tuple[dict[str, str], str]:
    """({set: caption}, failure reason or "") of one sample from its caption row in each named set (None:
    no row), the curated alt text and the derived sets. No kept caption in any named set: ({}, the
    reason of the first set)."""
    texts: dict[str, str] = {}
    failure = ""
    for name, row in rows.items():
        if row is None:
            why = reasons.MISSING_CAPTION  # reported, never guessed from the original caption
        elif row.get("status") != reasons.KEPT:
            reason = row.get("reason") or ""
            why = reason if reasons.is_reason(reason) else reasons.CAPTION_ERROR
        elif not (row.get("caption") or "").strip():
            why = reasons.EMPTY_CAPTION
        else:
            texts[name] = row["caption"].strip()
            continue
        failure = failure or why
    if not texts:
        return {}, failure
    original = next((r["original_caption"] for r in rows.values() if r and r.get("original_caption") is not None), None)
    original = (alt_text if original is None else original).strip()
    if original:
        texts[encoded.ORIGINAL] = original
    for name, src in derived.items():
        if src in texts:
            texts[name] = first_sentence(texts[src])
    return texts, ""


# ---------------------------------------------------------------------------------------------
# Adding sets to committed tars
# ---------------------------------------------------------------------------------------------


def present(tar: Any, rows_columns: list[str]) -> set[str]:
    """The sets a committed tar holds: its side files, and for a version 1 tar the inline sets its row
    file has a length column of."""
    have = set(encoded.set_files(tar))
    have |= {n for n in encoded.INLINE_SETS if encoded.len_column(n) in rows_columns}
    return have


def add_tasks(encdir: Any, plan: SetPlan, caption_file: Any) -> list[dict[str, Any]]:
    """One task per committed tar missing sets of this run: its keys in order with their source shard,
    the sets to add, and per named set the caption file of each source shard (`caption_file(name,
    source name)`). `original` is in every tar (written with it), so it is never added."""
    import pyarrow.parquet as pq

    tasks = []
    for tar in encoded.committed_shards(encdir):
        with encoded.rows_file(tar).open("rb") as f:
            table = pq.ParquetFile(f)
            names = table.schema_arrow.names
            rows = table.read(columns=["key", "source"])
        missing = [n for n in plan.names if n != encoded.ORIGINAL and n not in present(tar, names)]
        if not missing:
            continue
        keys, sources = rows.column("key").to_pylist(), rows.column("source").to_pylist()
        need = sorted({plan.derived.get(n, n) for n in missing} - {encoded.ORIGINAL})
        tasks.append(
            dict(
                tar=tar.relative_to(encdir),
                rows=encoded.rows_file(tar),
                keys=keys,
                sources=sources,
                sets=missing,
                derived={n: s for n, s in plan.derived.items() if n in missing},
                captions={n: {s: caption_file(n, s) for s in sorted(set(sources))} for n in need},
            )
        )
    return tasks


class SetFiles:
    """The driver's side of adding sets: rows arrive in tar order (tasks in order, order preserved);
    each tar's side files are written once all its rows are in."""

    def __init__(self, encdir: Any, tasks: list[dict[str, Any]]):
        self.encdir, self.tasks = encdir, {t["tar"]: t for t in tasks}
        self.rows: dict[str, list[tuple[str, dict[str, str], dict[str, Any], dict[str, float]]]] = {}
        self.written = 0

    def add(self, tar: str, key: str, texts: dict[str, str], feats: dict[str, Any], clip: dict[str, float]) -> None:
        got = self.rows.setdefault(tar, [])
        got.append((key, texts, feats, clip))
        task = self.tasks[tar]
        if len(got) == len(task["keys"]):
            for name in task["sets"]:
                encoded.write_set(
                    self.encdir / tar,
                    name,
                    [(k, t.get(name), f.get(name), c.get(name)) for k, t, f, c in got],
                )
                self.written += 1
            del self.rows[tar]
