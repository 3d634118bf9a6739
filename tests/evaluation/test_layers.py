"""evaluation/ imports in one direction: statistics <- vote store <- judge and study <- page server,
and nothing from training/ (it meets training only through files)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# module -> the evaluation modules it may import (the rest of the project: shards, encoders, common)
ALLOWED = {
    "stats": set(),
    "store": set(),
    "scores": set(),
    "fid": set(),
    "judge": {"store", "study"},
    "results": {"stats", "scores"},
    "study": {"stats", "store"},
    "page": {"store"},
    "serve": {"page", "results", "stats", "study", "store"},
    "evaluate": {"fid", "results", "scores", "stats", "study", "store"},
    "generate": set(),
}


def evaluation_imports(path: Path) -> tuple[set[str], set[str]]:
    """(evaluation modules, other top-level packages) that `path` imports, lazy imports included."""
    own, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                (own if a.name.startswith("evaluation.") else other).add(a.name.removeprefix("evaluation."))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "evaluation":
                own |= {a.name for a in node.names}
            elif node.module.startswith("evaluation."):
                own.add(node.module.split(".")[1])
            else:
                other.add(node.module.split(".")[0])
    return own, {o.split(".")[0] for o in other}


def test_every_module_imports_only_what_its_layer_allows():
    modules = sorted(p.stem for p in (ROOT / "evaluation").glob("*.py") if p.stem != "__init__")
    assert set(modules) == set(ALLOWED), "a new module: give it its place in ALLOWED"
    for name in modules:
        own, other = evaluation_imports(ROOT / "evaluation" / f"{name}.py")
        assert own <= ALLOWED[name], f"evaluation/{name}.py imports {sorted(own - ALLOWED[name])}"
        assert not other & {"training", "curation", "captioning", "encoding"}, f"evaluation/{name}.py: {other}"


def test_the_allowed_graph_has_no_cycle():
    done = set()

    def visit(node, path):
        assert node not in path, f"cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        for nxt in ALLOWED[node]:
            visit(nxt, [*path, node])
        done.add(node)

    for node in ALLOWED:
        visit(node, [])
    assert len(done) == len(ALLOWED)
