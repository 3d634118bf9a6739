"""Which nodes each step's Ray work ran on: `_work/nodes/<step>/<node id>`, touched by the work itself.

Cheap (one empty file per step and node, checked once per process) and visible in stats.json
(`nodes`), so an operator (and the multi-node test) can see that a step really spread over the cluster.
"""

from __future__ import annotations

from pathlib import Path

from shards import atomic, storage

STEPS = ("download", "measure", "embed", "dedup", "write")
_marked: set[tuple[str, str]] = set()  # (bucket work, step) recorded by this process: one HEAD (+ PUT), not per task


def mark(work: str | Path | storage.Loc | None, step: str) -> None:
    """Record that this process's node ran some of `step` (no-op outside a Ray worker or without `work`)."""
    import ray

    if work is None or not ray.is_initialized():
        return
    loc = work if isinstance(work, storage.Loc) else storage.resolve(work)
    if (loc.url, step) in _marked:
        return
    path = loc / "nodes" / step / ray.get_runtime_context().get_node_id()
    if not path.has_file():
        atomic.write_bytes(path, b"")
    if not loc.is_local:  # a stat on disk costs nothing; a bucket request per task would
        _marked.add((loc.url, step))


def counts(work: str | Path | storage.Loc) -> dict[str, int]:
    """{step: number of distinct nodes that ran it} (a listing: the record is informative, never a resume decision)."""
    root = (work if isinstance(work, storage.Loc) else storage.resolve(work)) / "nodes"
    return {s: n for s in STEPS if (n := len((root / s).iterdir()))}
