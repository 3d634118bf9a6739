"""The tier rule on images of known sizes, against PixArt-Sigma's tables."""

import pytest

from shards import buckets
from shards.errors import SigmaError


def test_tables_shape():
    for name in ("256", "512", "1024", "2048", "2880"):
        t = buckets.table(name)
        assert len(t) == 40 and "1.0" in t
    assert buckets.table("1k")["1.0"] == (1024, 1024)
    assert buckets.table("4k")["1.0"] == (2880, 2880)


@pytest.mark.parametrize(
    "h, w, tier",
    [
        (1024, 1024, "1k"),
        (1023, 1024, None),  # nearest bucket 1.0 = 1024x1024 not covered
        (2048, 2048, "2k"),
        (2879, 2880, "2k"),
        (2880, 2880, "4k"),
        (768, 1344, "1k"),  # 0.57 bucket = 768x1344
        (600, 800, None),
        (1440, 2560, "1k"),  # 0.56 -> 0.57 bucket of the 2048 table is 1536x2688: not covered
    ],
)
def test_tier_of(h, w, tier):
    assert buckets.tier_of(h, w) == tier


def test_tier_matches_rule_for_many_sizes():
    for h in range(900, 3200, 137):
        for w in range(900, 3200, 171):
            tier = buckets.tier_of(h, w)
            for name, table in (("1k", "1024"), ("2k", "2048"), ("4k", "2880")):
                _, (bh, bw) = buckets.nearest_bucket(h, w, table)
                if tier is not None and ["1k", "2k", "4k"].index(tier) >= ["1k", "2k", "4k"].index(name):
                    assert h >= bh and w >= bw
            if tier != "4k":
                nxt = {None: "1024", "1k": "2048", "2k": "2880"}[tier]
                _, (bh, bw) = buckets.nearest_bucket(h, w, nxt)
                assert h < bh or w < bw


def test_unknown_tier():
    with pytest.raises(SigmaError, match="unknown tier '8k'"):
        buckets.qualifies(100, 100, "8k")
