"""The folder layout is the architecture: each package folder's README names its modules in a
table (and names nothing that is not there), and entry points put the repository on the path one way.

A module is a `.py` file (not `__init__.py`) or an entry-point script (an executable `#!` file
without a suffix, e.g. `training/finetune`). The table is the README's first table whose first
header cell is "module"; a row may name several (`` `encode.py` + `encode` ``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not packages of the toolkit: the tests themselves, and the benchmarks (named in benchmarks/run.py's TOPICS).
NOT_PACKAGES = {"tests", "benchmarks"}
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name not in NOT_PACKAGES)


def modules(folder: Path) -> set[str]:
    """The `.py` modules and entry-point scripts of a folder (not its subfolders)."""
    out = {p.name for p in folder.glob("*.py") if p.name != "__init__.py"}
    for p in folder.iterdir():
        if p.is_file() and not p.suffix and p.read_bytes()[:2] == b"#!":
            out.add(p.name)
    return out


def module_table(readme: Path) -> list[str]:
    """The first cells of the rows of the README's module table."""
    rows, inside = [], False
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            if inside:
                break
            continue
        if not inside:
            inside = cells[0].lower() == "module"
            continue
        if not set(cells[0]) <= set("-: "):
            rows.append(cells[0])
    return rows


def test_every_package_folder_is_checked():
    assert {"common", "shards", "encoders", "curation", "captioning", "encoding", "training", "demo"} <= set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_readme_module_table_matches_the_folder(package):
    folder = ROOT / package
    readme = folder / "README.md"
    assert readme.is_file(), f"{package}/README.md: missing (a folder README names its modules in a table)"
    rows = module_table(readme)
    assert rows, f"{package}/README.md: no module table (a table whose first header cell is 'module')"
    named = {n for row in rows for n in re.findall(r"`([^`]+)`", row)}
    on_disk = modules(folder)
    missing = sorted(on_disk - named)
    assert not missing, f"{package}/README.md: the module table lacks {', '.join(missing)}"
    gone = sorted(n for n in named if not (folder / n).exists())
    assert not gone, f"{package}/README.md: the module table names {', '.join(gone)}, not in {package}/"


def test_module_table_parsing(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\n| column | meaning |\n| --- | --- |\n| `key` | k |\n\n"
        "| module | job |\n| --- | --- |\n| `a.py` + `a` | one |\n| `b.py`, `c.py` | two |\n\nText `d.py`.\n"
    )
    assert module_table(readme) == ["`a.py` + `a`", "`b.py`, `c.py`"]
    (tmp_path / "a").write_text("#!/usr/bin/env python3\n")
    (tmp_path / "a.py").write_text("")
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "data").write_text("not a script\n")
    assert modules(tmp_path) == {"a", "a.py"}


# The one way an entry-point script (`training/finetune`, `curation/run.py`) finds the repository;
# `python -m benchmarks.X` and the tests run from the repository root and need none.
SHIM = "sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))"


def test_entry_points_put_the_repository_on_the_path_one_way():
    scripts, others = [], []
    for folder in [ROOT / p for p in PACKAGES] + [ROOT / "benchmarks"]:
        for p in sorted(folder.iterdir()):
            if p.is_file() and (p.suffix == ".py" or p.name in modules(folder)):
                (scripts if p.read_bytes()[:2] == b"#!" else others).append(p)
    assert len(scripts) >= 9
    odd = [str(p.relative_to(ROOT)) for p in scripts if SHIM not in p.read_text()]
    assert not odd, f"entry points without the shared line `{SHIM}`: {odd}"
    touching = [str(p.relative_to(ROOT)) for p in others if "sys.path" in p.read_text()]
    assert not touching, f"modules that change sys.path (only entry points do, with `{SHIM}`): {touching}"
