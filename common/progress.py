"""Progress bars for the long steps of every stage: rate and ETA on a terminal, silent elsewhere.

Under `ray job submit`, in CI logs or with output redirected, stderr is not a TTY and the bars stay
off: there each stage prints its own per-shard or per-N-steps lines instead. Ray Data's per-operator
bars are switched off in `ray_start.init_ray` so that one bar per stage counts what the user thinks in
(URLs, captions, samples, steps), not blocks.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm


def bar(total: int | None, unit: str, desc: str, initial: int = 0, quiet: bool = False) -> tqdm[Any]:
    """A tqdm bar on stderr, shown only when stderr is a terminal (decided when the bar is made) and
    not `quiet` (e.g. every rank but the first of a multi-process run)."""
    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        disable=quiet or not sys.stderr.isatty(),
        smoothing=0.05,
        mininterval=1.0,
        dynamic_ncols=True,
    )


def say(line: str, file: IO[str] | None = None) -> None:
    """Print a line above any open bar (the bar redraws below it); a plain print when no bar is open."""
    file = file or sys.stdout
    tqdm.write(line, file=file)
    file.flush()  # logs read by people tailing them
