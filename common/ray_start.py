"""Ray start-up for every stage: join the cluster `ray job submit` runs us in, or start a local one.

Library `run()` functions call it (not only entry points), so it lives apart from the CLI flags.
"""

from __future__ import annotations

import os
from typing import Any

from common import quiet
from common.config import DEFAULT_CONFIG, Config

REPO_ROOT = str(DEFAULT_CONFIG.parent)


def init_ray(cfg: Config, runtime_env: dict[str, Any] | None = None) -> Any:
    """Join the cluster `ray job submit` runs us in, or start a local one; quiet on a laptop (common/quiet.py)."""
    import ray
    from ray.data import DataContext

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    DataContext.get_current().enable_progress_bars = False  # each stage has its own: common.progress
    quiet.drop(*quiet.PROGRESS_BARS)
    if ray.is_initialized():
        return ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, ignore_reinit_error=True, runtime_env=runtime_env)
    else:
        # A local cluster: its workers inherit this process's environment, so what they need is set
        # here (as a job runtime_env it would keep Ray from using its pre-started workers: benchmarks/RESULTS.md).
        # Workers import this checkout the way the driver does.
        paths = [REPO_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-actor "Loading weights" bars: not the user's
        quiet.drop(*quiet.TOKEN_AUTH)
        # address="local": a new local Ray even when another one runs on this machine (`ray start`)
        ray.init(
            address="local",
            num_cpus=cfg.ray.num_cpus,
            include_dashboard=False,
            ignore_reinit_error=True,
            runtime_env=runtime_env,
        )
    quiet.spend_actor_restart_warning(ray)
    return ray
