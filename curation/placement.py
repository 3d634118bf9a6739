"""Which nodes each step's Ray work ran on: `_work/nodes/<step>/<node id>`, touched by the work itself.

Cheap (one empty file per step and node) and visible in stats.json (`nodes`), so an operator (and
the multi-node test) can see that a step really spread over the cluster.
"""

from __future__ import annotations

from pathlib import Path

STEPS = ("download", "measure", "embed", "dedup", "write")


def mark(work: str | Path | None, step: str) -> None:
    """Record that this process's node ran some of `step` (no-op outside a Ray worker or without `work`)."""
    import ray

    if work is None or not ray.is_initialized():
        return
    folder = Path(work) / "nodes" / step
    path = folder / ray.get_runtime_context().get_node_id()
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        path.touch()


def counts(work: str | Path) -> dict[str, int]:
    """{step: number of distinct nodes that ran it}."""
    root = Path(work) / "nodes"
    return {s: len(list((root / s).iterdir())) for s in STEPS if (root / s).is_dir()}
