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

    from common import config, ray_start

    ray_start.init_ray(config.load(ROOT / "pipelines.yaml", "demo"))
    yield ray
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on its own tmpfs of that size: a real full disk (ENOSPC).
    Mounting needs root (CI and this machine run as root); elsewhere the test is skipped."""
    import subprocess

    mounts: list[Path] = []

    def make(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def shard_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny T5 and VAE, built by the builders the demo uses (fixed seeds): tests/encoders, tests/encoding."""
    from encoders import t5, vae

    root = tmp_path_factory.mktemp("models")
    return {"t5": t5.build_tiny(root / "t5"), "vae": vae.build_tiny(root / "vae")}
