"""Whether this Python is the project's: every entry-point script calls `check()` right after its path
line, before its first third-party import, so a command started with the system python (no venv)
ends in one line saying how to get the environment, not in `ModuleNotFoundError: No module named 'tqdm'`.

Standard library only, and nothing newer than Python 3.7 syntax: it must run on whatever `python3`
a user has, to be able to say that it is the wrong one.
"""

from __future__ import annotations  # annotations stay text: this parses on Python 3.7+

import importlib.util
import os
import sys
from collections.abc import Sequence

PYTHON = (3, 11)  # pyproject.toml's requires-python
# Import names of packages the entry points load first (pyproject.toml's dependencies); finding them
# does not import them (~1 ms for all).
PACKAGES = ("yaml", "numpy", "torch", "tqdm", "pyarrow", "PIL", "fsspec", "ray")


def missing(packages: Sequence[str] = PACKAGES) -> str | None:
    """The first of `packages` this interpreter cannot import, or None."""
    for name in packages:
        if importlib.util.find_spec(name) is None:
            return name
    return None


def check(packages: Sequence[str] = PACKAGES) -> None:
    """Exit with one line and status 2 when this interpreter is not the project's environment."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    venv = os.path.join(root, ".venv", "bin", "python")
    how = f"run `make setup` once in {root}, then `. .venv/bin/activate` (or start the command with {venv})"
    if sys.version_info[:2] != PYTHON:
        found = "{}.{}".format(*sys.version_info[:2])
        problem = f"{sys.executable} is Python {found}, the project needs Python {PYTHON[0]}.{PYTHON[1]}"
    else:
        name = missing(packages)
        if name is None:
            return
        problem = f"{sys.executable} lacks the project's packages (no module {name!r})"
    sys.stderr.write(f"error: {problem}: not the project's environment; {how}\n")
    sys.exit(2)
