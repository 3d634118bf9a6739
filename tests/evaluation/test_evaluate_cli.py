"""evaluation/'s command lines: --help reads as written for every entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "command, words",
    [
        ("evaluate", ["95% bootstrap", "--reference", "--inception", "torch device"]),
        ("generate", ["--pipeline", "hub id", "--seeds"]),
        ("serve", ["--port", "127.0.0.1"]),
        ("judge", ["MODEL", "EVALDIR", "both orders"]),
    ],
)
def test_help_prints_percent_once_and_documents_its_flags(command, words):
    r = subprocess.run(
        [sys.executable, str(ROOT / "evaluation" / command), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "%%" not in r.stdout and all(w in r.stdout for w in words), r.stdout
