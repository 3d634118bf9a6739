"""Fixtures every stage's tests share: the tiny offline models, the demo config, a local Ray.

Stage-specific fixtures live in tests/<stage>/conftest.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny random-weight models, built once (deterministic) into .cache/tiny."""
    from demo import tiny_models

    return tiny_models.build(ROOT / ".cache" / "tiny")


@pytest.fixture(scope="session")
def demo_cfg(tiny_models):
    from common import config

    return config.load(ROOT / "pipelines.yaml", "demo")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    from common import cli, config

    cli.init_ray(config.load(ROOT / "pipelines.yaml", "demo"))
    yield ray
    ray.shutdown()
