"""Fixtures for the encode stage and the loader: the tiny T5 + VAE and a demo config pointing at them."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shard_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny T5 and VAE, built by the builders the demo uses (fixed seeds)."""
    from encoders import t5, vae

    root = tmp_path_factory.mktemp("models")
    return {"t5": t5.build_tiny(root / "t5"), "vae": vae.build_tiny(root / "vae")}

