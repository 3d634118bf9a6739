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
LAYERS = {"shards": {"shards"}, "encoders": {"shards", "encoders"}, "common": {"shards", "common"},
          **{s: {"shards", "encoders", "common", s} for s in STAGES}}
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
    scripts = [p for p in folder.iterdir() if p.is_file() and not p.suffix and p.read_text().startswith("#!/usr/bin/env python")]
    return sorted(folder.glob("*.py")) + scripts


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_imports_follow_the_layers(package):
    wrong = {f"{p.relative_to(ROOT)} imports {name}" for p in sources(package)
             for name in imports(p) & PROJECT - LAYERS[package]}
    assert not wrong, sorted(wrong)


def test_the_contract_layer_loads_no_ray_and_no_model_library():
    wrong = {f"{p.relative_to(ROOT)} imports {name}" for p in sources("shards") for name in imports(p) & NOT_IN_SHARDS}
    assert not wrong, sorted(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("def f():\n    from curation import dedup\n")
    assert imports(bad) & PROJECT - LAYERS["training"] == {"curation"}
