"""Results streamed back from Ray: rows grouped by shard (a shard is handed on once all its rows have
come), and task results with a bounded number in flight.

Curation (scored rows per download shard) and recaptioning (captions per curated shard) both write
one file per shard from a stream whose rows arrive in any order; this is that bookkeeping, once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator
from typing import Any


class ShardGather:
    """`add(shard, row)` returns the shard's rows when its `expected[shard]`-th row comes, else None."""

    def __init__(self, expected: dict[Hashable, int]):
        self.expected = dict(expected)
        self.pending: dict[Hashable, list[Any]] = defaultdict(list)

    def add(self, shard: Hashable, row: Any) -> list[Any] | None:
        rows = self.pending[shard]
        rows.append(row)
        if len(rows) < self.expected[shard]:
            return None
        del self.pending[shard]
        return rows

    def close(self) -> None:
        """After the stream: a shard still short of rows means a reader and the count disagreed (a bug)."""
        if self.pending:
            short = {s: f"{len(r)}/{self.expected[s]}" for s, r in sorted(self.pending.items())}
            raise RuntimeError(f"incomplete shards after the run (rows/expected): {short}")


def bounded(jobs: Iterable[tuple[Any, Any]], window: int) -> Iterator[tuple[Any, Any]]:
    """(key, result) of each (key, Ray ref) of `jobs` as it finishes, with at most `window` refs in
    flight (the driver holds a task's handle only while it runs, however many tasks the run has)."""
    import ray

    jobs, pending = iter(jobs), {}
    while True:
        for key, ref in jobs:
            pending[ref] = key
            if len(pending) >= window:
                break
        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done[0]), ray.get(done[0])
