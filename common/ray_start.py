"""Ray for every stage: join the cluster `ray job submit` runs us in, or start a local one; model actor pools.

Library `run()` functions call it (not only entry points), so it lives apart from the CLI flags.
"""

from __future__ import annotations

import json
import os
from typing import Any

from common import quiet
from common.config import DEFAULT_CONFIG, Config

REPO_ROOT = str(DEFAULT_CONFIG.parent)
# What every worker needs in its environment, with why. A local cluster's workers inherit the driver's
# environment; a cluster's workers were started by `ray start` on their node, so these travel as the
# job's runtime_env `env_vars` when we join one (`worker_env_vars`).
WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",  # albumentations (imported with img2dataset) asks PyPI for a newer version
    "TOKENIZERS_PARALLELISM": "false",  # HF tokenizers' threads in actors: its fork warning, cores oversubscribed
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # per-actor "Loading weights" bars: not the user's
}
# Set by the user in the driver's shell, they decide where workers' models come from: passed on as they are.
PASSED_ON = ("HF_HUB_OFFLINE", "HF_ENDPOINT")
JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` in the driver: the job's own runtime_env


def worker_env_vars() -> dict[str, str]:
    """The env_vars a joined cluster's workers get (WORKER_ENV, unless the user set them otherwise, and
    PASSED_ON), less those the submitted job's runtime_env already sets: Ray refuses a ray.init
    runtime_env that repeats a key of the job's ("Failed to merge the Job's runtime env")."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    job = json.loads(os.environ.get(JOB_CONFIG) or "{}")
    taken = ((job.get("runtime_env") or {}).get("env_vars") or {}).keys()
    return {k: os.environ[k] for k in (*WORKER_ENV, *PASSED_ON) if k in os.environ and k not in taken}


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
        env_vars = {**worker_env_vars(), **(runtime_env or {}).get("env_vars", {})}
        job_env = {**(runtime_env or {}), "env_vars": env_vars} if env_vars else runtime_env
        ray.init(address=address, ignore_reinit_error=True, runtime_env=job_env)
    else:
        # A local cluster: its workers inherit this process's environment, so what they need is set
        # here (as a job runtime_env it would keep Ray from using its pre-started workers: benchmarks/RESULTS.md).
        # Workers import this checkout the way the driver does.
        paths = [REPO_ROOT, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)
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


def on_actors(ds: Any, stage: Any, kwargs: dict[str, Any], r: Any, **extra: Any) -> Any:
    """`ds` through a pool of model actors (`stage(**kwargs)` per actor) sized by a `Resources` config."""
    import ray

    return ds.map_batches(
        stage,
        fn_constructor_kwargs=kwargs,
        batch_size=r.batch_size,
        num_gpus=r.num_gpus or None,
        num_cpus=r.num_cpus,
        compute=ray.data.ActorPoolStrategy(size=r.concurrency),
        batch_format="numpy",
        **extra,
    )
