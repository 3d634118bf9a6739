"""PixArt-Sigma aspect-ratio bucket tables and the tier rule.

Tables come from PixArt-sigma (`diffusion/data/datasets/utils.py`): key = height/width as a
string, value = [height, width] in pixels. A sample's bucket in a table is the key nearest to its
own height/width; it *qualifies* for that table when it covers the bucket without upscaling.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from shards.errors import SigmaError

TABLE_FILE = Path(__file__).with_name("buckets.json")

# tier name -> table name (the table's nominal square side)
TIER_TABLES = {"256": "256", "512": "512", "1k": "1024", "2k": "2048", "4k": "2880"}
CURATION_TIERS = ("1k", "2k", "4k")  # what curation assigns, lowest first
MIN_ASPECT, MAX_ASPECT = 0.25, 4.0  # h/w range the tables span


@cache
def table(name: str) -> dict[str, tuple[int, int]]:
    """Bucket table by name ('256', '512', '1024', '2048', '2880') or tier ('1k', ...)."""
    name = TIER_TABLES.get(name, name)
    tables = json.loads(TABLE_FILE.read_text())["tables"]
    if name not in tables:
        raise SigmaError(f"unknown bucket table {name!r}; choose one of {sorted(tables)}")
    return {k: (int(v[0]), int(v[1])) for k, v in tables[name].items()}


def nearest_bucket(height: int, width: int, table_name: str) -> tuple[str, tuple[int, int]]:
    """The bucket key nearest to height/width, and its (height, width)."""
    ratio = height / width
    buckets = table(table_name)
    key = min(buckets, key=lambda k: abs(float(k) - ratio))
    return key, buckets[key]


def covers(height: int, width: int, table_name: str) -> bool:
    """True when the image reaches its nearest bucket in both dimensions (no upscaling needed)."""
    _, (bh, bw) = nearest_bucket(height, width, table_name)
    return height >= bh and width >= bw


def tier_of(height: int, width: int) -> str | None:
    """Highest curation tier (1k, 2k, 4k) the image qualifies for; None below 1k."""
    best = None
    for tier in CURATION_TIERS:
        if covers(height, width, tier):
            best = tier
    return best


def qualifies(height: int, width: int, tier: str) -> bool:
    """Whether an image of this size may be encoded at `tier` (256, 512, 1k, 2k, 4k)."""
    if tier not in TIER_TABLES:
        raise SigmaError(f"unknown tier {tier!r}; choose one of {list(TIER_TABLES)}")
    return covers(height, width, tier)
