"""Lines Ray prints on every run that are not the user's concern, silenced here one by one, with why.

Only these lines: anything else Ray, Ray Data or a worker logs still reaches the terminal, and each
command reports its own progress (common/progress.py) and errors (common/cli.py).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

# Ray 2.60 turns token authentication on for the local cluster `ray.init` starts and says so each
# time. We keep it on (a security feature); only that notice goes, the "disabled" warning stays.
TOKEN_AUTH = ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled")
# Ray Data's advice to turn back on the bars we turn off on purpose (common/ray_start.init_ray).
PROGRESS_BARS = ("ray.data._internal.progress", "Progress bars disabled.")


class _DropPrefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def drop(logger_name: str, prefix: str) -> None:
    """Drop that logger's records whose message starts with `prefix` (idempotent)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropPrefix) and f.prefix == prefix for f in logger.filters):
        logger.addFilter(_DropPrefix(prefix))


def spend_actor_restart_warning(ray: Any) -> None:
    """Let a throwaway actor take the core worker's "Actor ... has constructor arguments in the object
    store and max_restarts > 0" error (ray-project/ray#53727) while stderr points at /dev/null.

    Ray Data 2.60 starts every actor stage (Embed, HFCaptioner, T5Stage, Judge, ...) with its UDF
    and DataContext as `ray.put` refs and `max_restarts=-1`, so the line came once per command
    whatever our arguments. Those refs are held by the driver for the whole run, so restarts do
    work: the warning (about args that go out of scope) does not apply, and we keep restarts. The
    C++ logger writes it to fd 2 once per process, synchronously in `.remote()`: hence this.
    """

    class _Spend:
        def __init__(self, _arg: object) -> None:
            pass

    spend = ray.remote(num_cpus=0, max_restarts=1)(_Spend)

    arg = ray.put(None)
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        actor = spend.remote(arg)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(actor)
