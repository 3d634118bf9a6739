"""The whole stage on a real local Ray against the loopback server: every URL accounted for."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import config
from shards import reasons

ROOT = Path(__file__).resolve().parents[2]

# URL order puts each duplicate in a different download shard (5 URLs each) from its kept twin
ORDER = [
    "near-small.jpg",
    "square-1k.jpg",
    "hires-2k.jpg",
    "small.jpg",
    "panorama.jpg",
    "uhd-4k.jpg",
    "wide-1k.webp",
    "flat.png",
    "portrait-1k.png",
    "rotated.jpg",
    "near-big.jpg",
    "exact-copy.jpg",
]
FAULTS = ["http_404", "timeout", "not_an_image", "truncated", "decompression_bomb", "opt_out", "connection_error"]


def demo_cfg(*overrides):
    return config.load(
        ROOT / "pipelines.yaml",
        "demo",
        ["curation.download.shard_size=5", "curation.download.timeout=2", "curation.shard_size=2", *overrides],
    )


def test_every_url_once_with_a_valid_status(curated):
    out, m, stats, urls = curated
    assert sorted(m["url"]) == sorted(urls) and m["key"].is_unique
    assert set(m["status"]) <= set(reasons.STATUSES)
    assert m.loc[m.status == "kept", "reason"].isna().all()
    assert all(reasons.is_reason(r) for r in m.loc[m.status != "kept", "reason"])
    assert stats["urls"] == len(urls) and stats["status"]["kept"] == (m.status == "kept").sum()
    assert m["input_status"].eq("carried").all()  # an input column clashing with the manifest is renamed, kept


def test_reason_codes(curated):
    _, m, _, _ = curated
    expected = {
        "http_404": "http_404",
        "timeout": "timeout",
        "not_an_image": "not_an_image",
        "truncated": "not_an_image",
        "decompression_bomb": "decompression_bomb",
        "opt_out": "opt_out",
        "connection_error": "connection_error",
        "ftp": "invalid_url",
        "small.jpg": "too_small",
        "panorama.jpg": "aspect_ratio",
        "flat.png": "low_quality",
        "near-small.jpg": "duplicate",
        "exact-copy.jpg": "duplicate",
    }
    assert m.loc[list(expected), "reason"].to_dict() == expected
    failed = [
        "http_404",
        "timeout",
        "not_an_image",
        "truncated",
        "decompression_bomb",
        "opt_out",
        "connection_error",
        "ftp",
    ]
    assert set(m.loc[failed, "status"]) == {"failed"}
    assert set(m.loc[["small.jpg", "panorama.jpg", "flat.png", "near-small.jpg"], "status"]) == {"rejected"}


def test_tiers_sizes_and_exif(curated):
    _, m, _, _ = curated
    kept = m[m.status == "kept"]
    assert kept["tier"].to_dict() == {
        "square-1k.jpg": "1k",
        "hires-2k.jpg": "2k",
        "uhd-4k.jpg": "4k",
        "wide-1k.webp": "1k",
        "portrait-1k.png": "1k",
        "rotated.jpg": "1k",
        "near-big.jpg": "2k",
    }
    assert (m.loc["rotated.jpg", "width"], m.loc["rotated.jpg", "height"]) == (1024, 1344)  # EXIF 6 applied
    assert (m.loc["wide-1k.webp", "width"], m.loc["wide-1k.webp", "height"]) == (1344, 768)
    assert kept["aesthetic"].notna().all()  # demo: aesthetic filter off, score still recorded


def test_dedup_across_shards_keeps_highest_resolution(curated):
    out, m, _, _ = curated
    assert m.loc["near-small.jpg", "dup_of"] == m.loc["near-big.jpg", "key"]  # later, larger copy kept
    assert m.loc["exact-copy.jpg", "dup_of"] == m.loc["square-1k.jpg", "key"]
    assert m.loc["exact-copy.jpg", "sha256"] == m.loc["square-1k.jpg", "sha256"]
    inputs = sorted((out / "_work" / "input").glob("*.parquet"))
    where = {k: i for i, p in enumerate(inputs) for k in pq.read_table(p, columns=["key"])["key"].to_pylist()}
    assert where[m.loc["near-small.jpg", "key"]] != where[m.loc["near-big.jpg", "key"]]
    assert where[m.loc["exact-copy.jpg", "key"]] != where[m.loc["square-1k.jpg", "key"]]


def test_shards_hold_original_bytes_sorted(curated, image_dir):
    out, m, stats, _ = curated
    kept = m[m.status == "kept"]
    by_key = {}
    tars = sorted((out / "shards").iterdir())
    assert [t.name for t in tars] == [f"{i:05d}.tar" for i in range(len(tars))] == sorted(set(kept["shard"]))
    for tar in tars:
        with tarfile.open(tar) as t:
            names = t.getnames()
            assert names == sorted(names)
            for n in names:
                by_key.setdefault(n.split(".")[0], {})[n.split(".", 1)[1]] = (t.extractfile(n).read(), tar.name)
    assert sorted(by_key) == sorted(kept["key"])
    for name, row in kept.iterrows():
        files = by_key[row["key"]]
        ext = {"jpg": "jpg", "png": "png", "webp": "webp"}[name.rsplit(".", 1)[1]]
        data, tar_name = files[ext]
        assert data == (image_dir / name).read_bytes() and tar_name == row["shard"]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
        meta = json.loads(files["json"][0])
        assert meta["url"] == row["url"] and meta["name"] == name and meta["tier"] == row["tier"]
        assert files["txt"][0].decode() == f"alt text {name}"
    assert stats["shards"] == len(tars) == 4  # 7 kept, 2 per shard
    assert len(list((out / "downloads").glob("*_stats.json"))) == 4 and not list((out / "downloads").glob("*.tar"))
    assert not list(out.rglob("*.tmp"))
    thumbs = {p.stem for p in (out / "thumbs").glob("*.jpg")}  # for the report's galleries of rejected images
    assert m.loc[["small.jpg", "panorama.jpg", "near-small.jpg"], "key"].isin(thumbs).all()
    assert not m.loc[m.status != "rejected", "key"].isin(thumbs).any()
    page = (out / "report.html").read_text()  # written last by the run itself
    assert "report" in page.lower() and page.count("data:image/png;base64") >= 2


def test_aesthetic_threshold_decides_on_recorded_scores(curated):
    from tests.curation import oracle

    out, m, _, _ = curated
    scores = m.loc[m.status == "kept", "aesthetic"].sort_values()
    threshold = float(scores.iloc[len(scores) // 2])
    cur = demo_cfg("curation.aesthetic.enabled=true", f"curation.aesthetic.threshold={threshold}").curation
    decisions = oracle.decide(out / "_work" / "scored", 4, cur)
    low = {k for k, (r, _) in decisions.items() if r == reasons.LOW_AESTHETIC}
    candidates = m[m.status.eq("kept") | m.reason.eq("duplicate")]
    assert low == set(candidates.loc[candidates.aesthetic < threshold, "key"]) and low


def test_rerun_of_a_finished_run_does_nothing(curated, ray_local):
    from curation import pipeline

    out, _, stats, _ = curated
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert pipeline.run(out.parent / "urls.parquet", out, demo_cfg()) == stats
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


def test_a_resume_with_other_urls_or_settings_is_refused(curated, tmp_path):
    """A finished --out never answers for another URL list or other settings (issue 15 item 2)."""
    from curation import pipeline
    from shards.errors import SigmaError

    out = curated[0]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    other = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/other.jpg"]}), other)
    with pytest.raises(SigmaError, match=r"made with another --urls \(see fingerprint.json\)"):
        pipeline.run(other, out, demo_cfg())
    with pytest.raises(SigmaError, match=r"made with another curation.dedup.phash_radius, curation.min_tier \("):
        pipeline.run(
            out.parent / "urls.parquet", out, demo_cfg("curation.dedup.phash_radius=9", "curation.min_tier=2k")
        )
    pipeline.run(out.parent / "urls.parquet", out, demo_cfg("curation.download.processes=1"))  # concurrency only
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
