"""The arguments every entry point shares: --config, --profile, --set, --dry-run.

Each entry point builds its parser with `parser(...)`, adds its own flags, and calls `load(args)`.
A bad config ends the program with its one-line message (exit 2), never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from common import config as config_mod
from shards.errors import SigmaError, user_message


def parser(prog: str, description: str, example: str) -> argparse.ArgumentParser:
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
    """Around an entry point's work: a SigmaError or a full disk (also from a Ray worker) becomes its
    one line and exit status 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except Exception as e:
        message = user_message(e)
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
