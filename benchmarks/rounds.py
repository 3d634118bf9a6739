"""How every benchmark reports a measurement repeated over rounds: the median, and the spread as min-max."""

from __future__ import annotations

import statistics


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """'median (min-max)' over the rounds, each number written with `fmt`."""
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"
