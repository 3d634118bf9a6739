"""The import direction of ../shared/docs/architecture.md, read from the source with `ast`.

Stages (curation, captioning, encoding, training, evaluation) import only the layers below them (shards,
encoders, common), never each other; shards imports no other project package and no Ray or model
library; encoders and common import only shards.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["curation", "captioning", "encoding", "training", "evaluation"]
LAYERS = {
    "shards": {"shards"},
    "encoders": {"shards", "encoders"},
    "common": {"shards", "common"},
    **{s: {"shards", "encoders", "common", s} for s in STAGES},
}
PROJECT = set(LAYERS) | {"demo", "benchmarks", "tests"}
NOT_IN_SHARDS = {"ray", "transformers", "diffusers", "open_clip", "timm"}


def imports(path: Path) -> set[str]:
    """Top-level names of every module `path` imports, at any depth (lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(package: str) -> list[Path]:
    folder = ROOT / package
    scripts = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.suffix and p.read_text().startswith("#!/usr/bin/env python")
    ]
    return sorted(folder.glob("*.py")) + scripts


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_follow_the_layers(package):
    wrong = {
        f"{p.relative_to(ROOT)} imports {name}"
        for p in sources(package)
        for name in imports(p) & PROJECT - LAYERS[package]
    }
    assert not wrong, sorted(wrong)


def test_the_contract_layer_loads_no_ray_and_no_model_library():
    wrong = {f"{p.relative_to(ROOT)} imports {name}" for p in sources("shards") for name in imports(p) & NOT_IN_SHARDS}
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from curation import dedup\n")
    assert imports(bad) & PROJECT - LAYERS["training"] == {"curation"}


# ---------------------------------------------------------------------------------------------
# No import cycle anywhere: module -> module edges, lazy imports included
# ---------------------------------------------------------------------------------------------

PACKAGES = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists())


def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def project_modules() -> dict[str, Path]:
    return {module_of(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def module_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from a import b` is module a.b when that is a module, else a)."""
    out = set()
    package = module_of(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and not name.endswith("__init__"):
                out.add(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_anywhere():
    modules = project_modules()
    graph = {m: module_imports(p, modules) - {m} for m, p in modules.items()}
    assert len(graph) > 50 and graph["curation.pipeline"] >= {"curation.dedup_job", "shards.curated"}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
