"""The dataset report, rendered in headless Chromium from a small real curated folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}

GALLERY_COUNTS = (
    "Object.fromEntries([...document.querySelectorAll('[data-gallery]')].map("
    "g => [g.dataset.gallery, [+g.dataset.count, +g.dataset.total, g.querySelectorAll('.tile img').length]]))"
)


def test_dataset_report_renders_in_chromium(curated_dir, browser, tmp_path):
    from curation.report import write_report

    out = write_report(curated_dir)
    assert out == curated_dir / "report.html"
    page = browser(out)
    assert page.errors == []
    assert page.broken_images() == 0
    # self-contained: every image is embedded, nothing points at a server or a file beside it
    assert page.evaluate(
        "[...document.querySelectorAll('[src],[href]')]"
        ".every(e => (e.getAttribute('src') || e.getAttribute('href')).startsWith('data:'))"
    )

    plots = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('figure.plot')]"
        ".map(f => [f.dataset.plot, f.querySelector('img').naturalWidth]))"
    )
    assert set(plots) == {
        "width",
        "height",
        "aspect",
        "tier",
        "aesthetic",
        "sharpness",
        "contrast",
        "brightness",
        "watermark",
    }  # nsfw never ran (all null): no plot
    assert all(w > 200 for w in plots.values()), plots

    status = page.evaluate(
        "[...document.querySelectorAll('table[data-table=status] tr')].slice(1)"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    assert status == [
        ["kept", "8", "40.0%"],
        ["rejected", "9", "45.0%"],
        ["failed", "3", "15.0%"],
        ["total", "20", "100%"],
    ]
    reasons = dict(
        page.evaluate(
            "[...document.querySelectorAll('table[data-table=reason] tr')].slice(1)"
            ".map(r => [r.cells[1].textContent, r.cells[2].textContent])"
        )
    )
    assert reasons == {
        "too_small": "3",
        "low_quality": "2",
        "low_aesthetic": "1",
        "duplicate": "3",
        "http_404": "2",
        "timeout": "1",
    }

    galleries = page.evaluate(GALLERY_COUNTS)
    # [tiles shown, total, tiles with an image]
    assert galleries["kept-top"] == [4, 8, 4]  # 8 kept: the top half and the bottom half
    assert galleries["kept-bottom"] == [4, 8, 4]
    assert galleries["rejected-too_small"] == [3, 3, 2]  # s002 has no thumbnail: a text tile
    assert galleries["rejected-low_quality"] == [2, 2, 2]
    assert galleries["rejected-duplicate"] == [3, 3, 3]
    top = page.evaluate("[...document.querySelectorAll('[data-gallery=kept-top] .tile')].map(t => t.dataset.key)")
    bottom = page.evaluate("[...document.querySelectorAll('[data-gallery=kept-bottom] .tile')].map(t => t.dataset.key)")
    assert top == ["k007", "k006", "k005", "k004"] and bottom == ["k000", "k001", "k002", "k003"]

    groups = page.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.group')].map("
        "g => [g.dataset.group, [...g.querySelectorAll('.tile')].map(t => t.dataset.key)]))"
    )
    assert groups == {"k000": ["k000", "d000", "d001"], "k001": ["k001", "d002"]}
    assert page.evaluate("document.querySelectorAll('.group img').length") == 5  # originals from the tars

    shot = page.screenshot(tmp_path / "dataset-report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_entry_point_draws_configured_thresholds(curated_dir, browser):
    cmd = [
        sys.executable,
        str(ROOT / "curation" / "report"),
        str(curated_dir),
        "--set",
        "curation.aesthetic.threshold=6.5",
        "--set",
        "curation.min_tier=2k",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(curated_dir / "report.html")
    page = browser(curated_dir / "report.html")
    assert page.errors == []
    settings = dict(
        page.evaluate(
            "[...document.querySelectorAll('table[data-table=thresholds] tr')].slice(1)"
            ".map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
    )
    assert settings["aesthetic.threshold"] == "6.5 (on)"
    assert settings["min_tier"] == "2k"


def test_entry_point_dry_run_and_bad_folder(curated_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "curation" / "report")]
    done = subprocess.run([*cmd, str(curated_dir), "--dry-run"], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"shards": 2' in done.stdout and not (curated_dir / "report.html").exists()
    done = subprocess.run([*cmd, str(tmp_path / "nowhere")], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "nowhere" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    "value,expected",
    [
        (3, "00003.tar"),
        ("00003", "00003.tar"),
        ("00003.tar", "00003.tar"),
        ("shards/00003.tar", "00003.tar"),
        (None, None),
        (float("nan"), None),
    ],
)
def test_shard_column_forms(tmp_path, value, expected):
    from curation.report import shard_path

    p = shard_path(tmp_path, value)
    assert (p.name if p else None) == expected


def test_rejected_thumbnails_from_download_tar(tmp_path):
    """Curation's hook: a bounded sample per reason, read at the recorded offsets of a download tar."""
    import io
    import tarfile

    from PIL import Image

    from curation.report import save_rejected_thumbnails, thumb_path

    src = tmp_path / "downloads" / "00000.tar"
    src.parent.mkdir()
    with tarfile.open(src, "w") as tar:
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (600, 300), (40 * i, 90, 200)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"{i:09d}.jpg")
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    with tarfile.open(src) as tar:
        places = [(m.offset_data, m.size) for m in tar]
    rows = [
        {
            "key": f"r{i}",
            "reason": "too_small" if i < 4 else "low_quality",
            "src": str(src),
            "offset": off,
            "size": size,
        }
        for i, (off, size) in enumerate(places)
    ]
    rows.append({"key": "gone", "reason": "http_404", "src": "", "offset": 0, "size": 0})  # never downloaded
    curdir = tmp_path / "cur"
    assert save_rejected_thumbnails(curdir, rows, per_reason=2) == 4
    assert sorted(p.stem for p in (curdir / "thumbs").iterdir()) == ["r0", "r1", "r4", "r5"]
    with Image.open(thumb_path(curdir, "r0")) as im:
        assert im.size == (256, 128) and im.getpixel((128, 64))[2] > 150  # the right bytes, downscaled
    assert save_rejected_thumbnails(curdir, rows, per_reason=2) == 0  # rerun: nothing new


# ---------------------------------------------------------------------------------------------
# A big manifest: the report streams it in batches and its aggregates match pandas on the whole
# ---------------------------------------------------------------------------------------------

REJECT = ["too_small", "low_quality", "low_aesthetic", "duplicate", "nsfw", "bad_aspect"]
FAIL = ["http_404", "timeout", "http_500", "decode_error"]


def write_big_manifest(curdir: Path, n: int, row_group: int) -> None:
    """n rows over several row groups with the real MANIFEST_COLUMNS (+ a carried column); scores
    rounded to 0.1 so the galleries have ties; nsfw all null (its filter never ran); no tars."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shards import format

    rng = np.random.default_rng(7)
    status = rng.choice(["kept", "rejected", "failed"], n, p=[0.5, 0.35, 0.15])
    reason = np.where(status == "kept", "", np.where(status == "rejected", rng.choice(REJECT, n), rng.choice(FAIL, n)))
    key = np.char.zfill(np.arange(n).astype(str), 9)
    failed, kept = status == "failed", status == "kept"
    dup = (reason == "duplicate") & (rng.random(n) < 0.9)
    originals = key[kept][:600]

    def size():  # 0: undecodable
        return pa.array(rng.integers(0, 4000, n), mask=failed)

    def score(values, null_share=0.0):
        return pa.array(values, mask=failed | (rng.random(n) < null_share))

    columns = {
        "url": pa.array(np.char.add("http://example.com/", key)),
        "key": pa.array(key),
        "status": pa.array(status),
        "reason": pa.array(reason),
        "width": size(),
        "height": size(),
        "tier": pa.array(rng.choice(["", "1k", "2k", "4k"], n), mask=failed),
        "aesthetic": score(np.round(rng.normal(5, 1, n), 1), 0.1),
        "sharpness": score(rng.lognormal(3, 2, n) * (rng.random(n) > 0.05)),
        "contrast": score(rng.normal(40, 10, n)),
        "brightness": score(rng.uniform(0, 255, n)),
        "nsfw": pa.nulls(n, pa.float64()),
        "watermark": score(rng.random(n), 0.3),
        "sha256": pa.array(np.char.zfill(np.arange(n).astype(str), 64)),
        "phash": pa.array(np.char.zfill(key, 16)),
        "dup_of": pa.array(np.where(dup, rng.choice(originals, n), ""), mask=~dup),
        "shard": pa.array(np.where(kept, "00000.tar", ""), mask=~kept),
        "caption": pa.array(np.char.add("alt ", key)),
    }
    assert list(columns)[: len(format.MANIFEST_COLUMNS)] == format.MANIFEST_COLUMNS
    curdir.mkdir(parents=True)
    pq.write_table(pa.table(columns), curdir / format.MANIFEST, row_group_size=row_group)


def expected_report(curdir: Path, cur) -> dict:
    """What the report shows, computed the old way: the whole manifest in one DataFrame."""
    import pandas as pd

    from curation import report
    from shards import format

    df = pd.read_parquet(curdir / format.MANIFEST, columns=format.MANIFEST_COLUMNS)
    for col in ("reason", "dup_of", "tier"):
        df[col] = df[col].fillna("")
    kept, rejected, failed = (df[df["status"] == s] for s in ("kept", "rejected", "failed"))
    scored = kept[kept["aesthetic"].notna()].sort_values("aesthetic", ascending=False, kind="stable")
    groups = rejected[rejected["dup_of"] != ""].groupby("dup_of").size().sort_values(ascending=False)
    d = df[(df["width"] > 0) & (df["height"] > 0)].assign(aspect=lambda d: d["height"] / d["width"])
    shape, scores = report._quantities(cur)
    return {
        "status": df["status"].value_counts().to_dict(),
        "reasons": [
            (s, r, n)
            for (s, r), n in df[df["status"] != "kept"]
            .groupby(["status", "reason"])
            .size()
            .sort_values(ascending=False)
            .items()
        ],
        "top": list(scored["key"][:24]),
        "bottom": list(scored["key"][-24:][::-1]),
        "scored": len(scored),
        "rejected": list(rejected["reason"].value_counts().items()),
        "too_small": list(rejected[rejected["reason"] == "too_small"]["key"][:24]),
        "groups": {g: [g, *rejected[rejected["dup_of"] == g]["key"][:24]] for g in groups.index[:12]},
        "failed": [
            (r, n, " ".join(failed[failed["reason"] == r]["url"][:5]))
            for r, n in failed["reason"].value_counts().items()
        ],
        "tiers": d["tier"].replace("", "below 1k").value_counts().to_dict(),
        "values": {q[0]: (d[q[0]], q) for q in shape + scores},
    }


def report_html_parts(html: str) -> dict:
    import re

    def table(name):
        body = re.search(f'<table data-table="{name}">(.*?)</table>', html).group(1)
        rows = re.findall(r"<tr>(.*?)</tr>", body)[1:]
        return [[c.replace(",", "") for c in re.findall(r"<td[^>]*>(.*?)</td>", r)] for r in rows]  # 1,234 -> 1234

    galleries = {
        g: (int(total), re.findall(r'data-key="([^"]+)"', body))
        for g, total, body in re.findall(
            r'data-gallery="([^"]+)" data-count="\d+" data-total="(\d+)">(.*?)</section>', html
        )
    }
    groups = {
        g: re.findall(r'data-key="([^"]+)"', body)
        for g, body in re.findall(r'<div class="group" data-group="([^"]+)" data-count="\d+">(.*?)</div></div>', html)
    }
    return {
        "status": table("status"),
        "reason": table("reason"),
        "failed": table("failed"),
        "galleries": galleries,
        "groups": groups,
    }


def check_streamed_report(curdir: Path, monkeypatch, batch: int) -> None:
    """Build the report with every whole-file reader disabled; compare it with pandas on the whole."""
    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    from common import pages
    from common.config import CurationConfig
    from curation import report

    cur = CurationConfig()
    want = expected_report(curdir, cur)

    def refuse(*args, **kwargs):
        raise AssertionError("the report must stream the manifest, not read it whole")

    for owner, name in [
        (pd, "read_parquet"),
        (pq, "read_table"),
        (pq, "ParquetDataset"),
        (pq.ParquetFile, "read"),
        (pq.ParquetFile, "read_row_groups"),
        (pq.ParquetFile, "read_row_group"),
    ]:
        monkeypatch.setattr(owner, name, refuse)
    scans, iter_batches = [], pq.ParquetFile.iter_batches

    def counted(self, batch_size=65536, columns=None, **kwargs):
        scans.append(list(columns))
        for b in iter_batches(self, batch_size=batch_size, columns=columns, **kwargs):
            assert b.num_rows <= batch  # never more than one batch of rows at a time
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    monkeypatch.setattr(report, "BATCH", batch)
    plots, bars = {}, {}
    monkeypatch.setattr(
        pages, "histogram_counts", lambda name, edges, counts, *a, **k: plots.update({name: (edges, counts)}) or ""
    )
    monkeypatch.setattr(pages, "bars", lambda name, counts, *a, **k: bars.update({name: counts}) or "")
    got = report_html_parts(report.build(curdir, cur))

    assert scans and all(not {"sha256", "phash", "caption"} & set(c) for c in scans), scans
    total = sum(want["status"].values())
    assert got["status"] == [
        [s, str(n), f"{100 * n / total:.1f}%"]
        for s, n in ((s, want["status"].get(s, 0)) for s in ("kept", "rejected", "failed"))
    ] + [["total", str(total), "100%"]]
    assert got["reason"] == [[s, r, str(n)] for s, r, n in want["reasons"]]
    g = got["galleries"]
    assert g["kept-top"] == (want["scored"], want["top"]) and g["kept-bottom"] == (want["scored"], want["bottom"])
    rejected = [(k[len("rejected-") :], total) for k, (total, _) in g.items() if k.startswith("rejected-")]
    assert rejected == want["rejected"]
    assert g["rejected-too_small"][1] == want["too_small"]  # no thumbnails saved: the first 24 in manifest order
    assert got["groups"] == want["groups"] and list(got["groups"]) == list(want["groups"])
    assert got["failed"] == [[r, str(n), u] for r, n, u in want["failed"]]
    assert {t: n for t, n in bars["tier"].items() if n} == want["tiers"]
    assert "nsfw" not in plots  # all null: no plot, as before
    for name, (values, (_, _, _, lines, log_x)) in want["values"].items():
        if name == "nsfw":
            continue
        v = pages.finite(values, log_x)  # the in-memory rule: pages.histogram on the whole column
        edges = pages.histogram_edges(v.min(), v.max(), lines, log_x=log_x)
        assert np.array_equal(plots[name][0], edges), name
        assert np.array_equal(plots[name][1], np.histogram(v, edges)[0]), name


def test_report_streams_a_big_manifest(tmp_path, monkeypatch):
    """30k rows in 6 row groups read in batches of 1,000: only iter_batches, results as pandas'."""
    write_big_manifest(tmp_path / "cur", 30_000, 5_000)
    check_streamed_report(tmp_path / "cur", monkeypatch, batch=1_000)


@pytest.mark.slow
def test_report_streams_300k_rows(tmp_path, monkeypatch):
    write_big_manifest(tmp_path / "cur", 300_000, 40_000)
    check_streamed_report(tmp_path / "cur", monkeypatch, batch=8_192)
