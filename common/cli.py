"""The arguments every entry point shares: --config, --profile, --set, --dry-run.

Each entry point builds its parser with `parser(...)`, adds its own flags, and calls `load(args)`.
A bad config ends the program with its one-line message (exit 2), never a traceback; `cmd | head`
ends it quietly (`quiet_broken_pipe`, installed by `parser`).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from common import config as config_mod
from shards.errors import SigmaError, user_message


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
    quiet_broken_pipe()
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("configuration (shared by every entry point)")
    g.add_argument("--config", default=None, help="pipelines.yaml to read (default: the repository's)")
    g.add_argument("--profile", default=None, help="named profile in the config: real, demo, ...")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set training.stages.1k.lr=1e-5 (repeatable)",
    )
    g.add_argument("--dry-run", action="store_true", help="print the resolved plan and exit")
    return p


def _stdout_to_devnull() -> None:
    """Point fd 1 at /dev/null, so the interpreter's last flush of what is still buffered succeeds."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _flush_at_exit() -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left before the end: nothing more to say to it
        _stdout_to_devnull()


_previous_hook = [sys.excepthook]  # the hook in place when ours went in (Ray's, if ray was imported first)


def _excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    if issubclass(kind, BrokenPipeError):
        _stdout_to_devnull()  # exit status 1, no traceback
        return
    _previous_hook[0](kind, value, tb)


def quiet_broken_pipe() -> None:
    """`cmd | head`: when the reader closes the pipe, the program ends without a BrokenPipeError
    traceback or "Exception ignored ... BrokenPipeError" (Python ignores SIGPIPE, so a write to a closed
    pipe raises; restoring SIGPIPE's default would also kill the process on a closed socket of Ray's).
    Idempotent."""
    if sys.excepthook is not _excepthook:
        _previous_hook[0] = sys.excepthook
        sys.excepthook = _excepthook
        atexit.register(_flush_at_exit)  # runs before the interpreter's own last flush


def load(args: argparse.Namespace) -> config_mod.Config:
    try:
        return config_mod.load(args.config, args.profile, args.overrides)
    except SigmaError as e:
        fail(str(e))


def fail(message: str) -> NoReturn:
    """One-line error and exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around an entry point's work: a SigmaError, a full disk or a store that stopped answering (also
    from a Ray worker) becomes its one line and exit status 2; anything else is a bug and keeps its
    traceback."""
    from shards import storage

    try:
        yield
    except Exception as e:
        message = user_message(e) or storage.fault_line(e)
        if message is None:
            raise
        fail(message)


def unchecked(problem: str) -> str:
    """A dry run planned without something a real run needs (data not there yet): say so on stderr, one line."""
    print(f"dry run: not checked: {problem}", file=sys.stderr)
    return problem


def print_plan(plan: dict[str, Any]) -> None:
    """What --dry-run prints: the resolved plan as JSON."""
    print(json.dumps(plan, indent=2, default=str))
