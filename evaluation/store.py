"""The vote store: the pairs an evaluation folder offers and every vote on them, in SQLite.

Pairs: for every (prompt, seed) that two or more models have under EVALDIR/images (read through
shards/evalset.py), every pair of those models. Each human rater sees the pairs in their own random
order with random left/right, both drawn from a hash of (salt, rater, pair): a reload shows the same
pair the same way, and a restarted server resumes where the rater stopped. The salt is random per
EVALDIR and kept in the database, so neither order, sides nor ids can be read off the page.

Votes: EVALDIR/preference.sqlite, one row per (rater, pair, question, left run), committed
(synchronous=FULL) before the call returns. Humans (evaluation/serve) and VLM judges
(evaluation/judge) write into the same table, told apart by `source`.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from shards import evalset

DB = "preference.sqlite"


def require_local(evaldir: str | Path) -> None:
    """The votes are a SQLite file in EVALDIR, and SQLite needs a disk (locks, writes in place): an EVALDIR
    given as a bucket URL is refused in one line (evaluate and generate work on a bucket; copy the folder
    to disk to serve or judge it)."""
    from shards import storage
    from shards.errors import SigmaError

    if not storage.resolve(evaldir).is_local:
        raise SigmaError(
            f"{evaldir}: the votes' database ({DB}, SQLite) lives on disk, not in a bucket; copy the "
            "evaluation folder to a local disk to serve or judge it"
        )


# ---------------------------------------------------------------------------------------------
# Pairs and votes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    id: str  # opaque: hash of the salt and the key
    prompt_idx: int
    seed: int
    prompt: str
    run_a: str  # run_a < run_b
    run_b: str
    image_a: Path
    image_b: Path


def digest(*parts) -> str:
    """sha256 of the parts joined: pair ids, image tokens, a rater's order and sides."""
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def load_pairs(evaldir: Path, salt: str) -> list[Pair]:
    """Every pair of runs sharing a (prompt_idx, seed) image, from the sidecars.

    A pair's id covers both sidecars, so images regenerated with other settings or another
    checkpoint are new pairs: votes on the old ones stay in the database but no longer count.
    """
    groups: dict[tuple[int, int], dict[str, tuple[str, Path, str]]] = {}
    for m in evalset.read_sidecars(evaldir):
        groups.setdefault((m["prompt_idx"], m["seed"]), {})[m["run"]] = (m["prompt"], m["png"], digest(m["text"]))
    pairs = []
    for (idx, seed), by_run in sorted(groups.items()):
        for a, b in combinations(sorted(by_run), 2):
            (prompt, png_a, sig_a), (_, png_b, sig_b) = by_run[a], by_run[b]
            pairs.append(Pair(digest(salt, idx, seed, a, b, sig_a, sig_b)[:16], idx, seed, prompt, a, b, png_a, png_b))
    return pairs


def sides(salt: str, rater: str, pair: Pair) -> tuple[str, str]:
    """(left run, right run) for this rater: random, but the same on every reload."""
    flip = int(digest(salt, rater, pair.id, "side")[:8], 16) & 1
    return (pair.run_b, pair.run_a) if flip else (pair.run_a, pair.run_b)


def next_pair(pairs: list[Pair], done: set[str], salt: str, rater: str) -> Pair | None:
    """The rater's first unjudged pair in their own random order."""
    pending = [p for p in pairs if p.id not in done]
    return min(pending, key=lambda p: digest(salt, rater, p.id, "order")) if pending else None


SOURCES = ("human", "judge")
QUESTIONS = ("overall", "quality", "alignment")  # humans answer one overall question; the judge two
JUDGE_QUESTIONS = QUESTIONS[1:]
VOTES_SQL = """CREATE TABLE IF NOT EXISTS votes (
    rater TEXT NOT NULL, pair TEXT NOT NULL, prompt_idx INTEGER, seed INTEGER,
    run_a TEXT NOT NULL, run_b TEXT NOT NULL, left_run TEXT NOT NULL, right_run TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'tie', 'invalid')), winner TEXT, created REAL,
    source TEXT NOT NULL DEFAULT 'human' CHECK (source IN ('human', 'judge')),
    question TEXT NOT NULL DEFAULT 'overall' CHECK (question IN ('overall', 'quality', 'alignment')),
    answer TEXT, PRIMARY KEY (rater, pair, question, left_run))"""
COLUMNS = (
    "rater",
    "pair",
    "prompt_idx",
    "seed",
    "run_a",
    "run_b",
    "left_run",
    "right_run",
    "choice",
    "winner",
    "created",
    "source",
    "question",
    "answer",
)


class Store:
    """The SQLite file: a random salt and the votes of humans and judges, one table.

    One row per (rater, pair, question, left run): a human has one per pair (their side is fixed),
    a judge four (two questions, both orders). Judge answers it could not parse are kept as
    choice `invalid` with the raw answer. One connection per call (server threads).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with self._connect() as db:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            old = [r[1] for r in db.execute("PRAGMA table_info(votes)")]
            if old and "source" not in old:  # a database from before judge votes: human votes, kept
                db.execute("ALTER TABLE votes RENAME TO votes_v1")
            db.execute(VOTES_SQL)
            if old and "source" not in old:
                db.execute(f"INSERT INTO votes ({', '.join(old)}) SELECT {', '.join(old)} FROM votes_v1")
                db.execute("DROP TABLE votes_v1")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('salt', ?)", (secrets.token_hex(16),))
            self.salt = db.execute("SELECT value FROM meta WHERE key = 'salt'").fetchone()[0]

    @contextlib.contextmanager
    def _connect(self):
        """A connection that commits on success and is always closed."""
        db = sqlite3.connect(self.path, timeout=30)
        try:
            db.execute("PRAGMA synchronous=FULL")
            with db:
                yield db
        finally:
            db.close()

    def judged(self, rater: str) -> set[str]:
        with self._connect() as db:
            return {r[0] for r in db.execute("SELECT pair FROM votes WHERE rater = ? AND source = 'human'", (rater,))}

    def record(self, rater: str, pair: Pair, choice: str) -> bool:
        """Store a human vote (choice: left/right/tie as seen by this rater); False if already judged."""
        left, right = sides(self.salt, rater, pair)
        row = _row(rater, pair, left, right, choice, "human", "overall", None)
        with self._connect() as db:  # commits on leaving the block
            cur = db.execute(f"INSERT OR IGNORE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 14)})", row)
        return cur.rowcount == 1

    def record_judge(self, rater: str, pair: Pair, answers: list[tuple[str, str, str, str]]) -> None:
        """All of a judge's answers on one pair, (question, left run, choice, raw answer) each, in one
        transaction: a pair is judged completely or not at all (resumption is per pair)."""
        rows = [
            _row(rater, pair, left, pair.run_b if left == pair.run_a else pair.run_a, choice, "judge", q, answer)
            for q, left, choice, answer in answers
        ]
        with self._connect() as db:
            db.executemany(f"INSERT OR REPLACE INTO votes ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * 14)})", rows)

    def judge_done(self, rater: str, answers_per_pair: int) -> set[str]:
        """Pairs this judge has answered completely."""
        with self._connect() as db:
            return {
                r[0]
                for r in db.execute(
                    "SELECT pair FROM votes WHERE rater = ? AND source = 'judge' GROUP BY pair HAVING COUNT(*) = ?",
                    (rater, answers_per_pair),
                )
            }

    def votes(self, pairs=None, source: str = "human", question: str = "overall") -> list[tuple[str, str, str | None]]:
        """(run_a, run_b, winner) of every valid vote of `source` on `question` (only on `pairs`, ids, if
        given); winner None is a tie."""
        return [
            (r["run_a"], r["run_b"], r["winner"])
            for r in self.rows(pairs, source, question)
            if r["choice"] != "invalid"
        ]

    def rows(self, pairs=None, source: str | None = None, question: str | None = None) -> list[dict]:
        """Whole vote rows (invalid ones included), filtered."""
        with self._connect() as db:
            db.row_factory = sqlite3.Row
            rows = [dict(r) for r in db.execute("SELECT * FROM votes")]
        return [
            r
            for r in rows
            if (pairs is None or r["pair"] in pairs)
            and source in (None, r["source"])
            and question in (None, r["question"])
        ]


def _row(rater: str, pair: Pair, left: str, right: str, choice: str, source: str, question: str, answer):
    winner = {"left": left, "right": right}.get(choice)  # None: a tie, or an invalid answer
    return (
        rater,
        pair.id,
        pair.prompt_idx,
        pair.seed,
        pair.run_a,
        pair.run_b,
        left,
        right,
        choice,
        winner,
        time.time(),
        source,
        question,
        answer,
    )
