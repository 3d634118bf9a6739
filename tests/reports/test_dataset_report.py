"""The dataset report, rendered in headless Chromium from a small real curated folder."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1"}

GALLERY_COUNTS = "Object.fromEntries([...document.querySelectorAll('[data-gallery]')].map(" \
                 "g => [g.dataset.gallery, [+g.dataset.count, +g.dataset.total, g.querySelectorAll('.tile img').length]]))"


def test_dataset_report_renders_in_chromium(curated_dir, browser, tmp_path):
    from curation.report import write_report

    out = write_report(curated_dir)
    assert out == curated_dir / "report.html"
    page = browser(out)
    assert page.errors == []
    assert page.broken_images() == 0
    # self-contained: every image is embedded, nothing points at a server or a file beside it
    assert page.evaluate("[...document.querySelectorAll('[src],[href]')]"
                         ".every(e => (e.getAttribute('src') || e.getAttribute('href')).startsWith('data:'))")

    plots = page.evaluate("Object.fromEntries([...document.querySelectorAll('figure.plot')]"
                          ".map(f => [f.dataset.plot, f.querySelector('img').naturalWidth]))")
    assert set(plots) == {"width", "height", "aspect", "tier", "aesthetic", "sharpness", "contrast",
                          "brightness", "watermark"}  # nsfw never ran (all null): no plot
    assert all(w > 200 for w in plots.values()), plots

    status = page.evaluate("[...document.querySelectorAll('table[data-table=status] tr')].slice(1)"
                           ".map(r => [...r.cells].map(c => c.textContent))")
    assert status == [["kept", "8", "40.0%"], ["rejected", "9", "45.0%"], ["failed", "3", "15.0%"],
                      ["total", "20", "100%"]]
    reasons = dict(page.evaluate("[...document.querySelectorAll('table[data-table=reason] tr')].slice(1)"
                                 ".map(r => [r.cells[1].textContent, r.cells[2].textContent])"))
    assert reasons == {"too_small": "3", "low_quality": "2", "low_aesthetic": "1", "duplicate": "3",
                       "http_404": "2", "timeout": "1"}

    galleries = page.evaluate(GALLERY_COUNTS)
    # [tiles shown, total, tiles with an image]
    assert galleries["kept-top"] == [4, 8, 4]  # 8 kept: the top half and the bottom half
    assert galleries["kept-bottom"] == [4, 8, 4]
    assert galleries["rejected-too_small"] == [3, 3, 2]  # s002 has no thumbnail: a text tile
    assert galleries["rejected-low_quality"] == [2, 2, 2]
    assert galleries["rejected-duplicate"] == [3, 3, 3]
    top = page.evaluate("[...document.querySelectorAll('[data-gallery=kept-top] .tile')].map(t => t.dataset.key)")
    bottom = page.evaluate("[...document.querySelectorAll('[data-gallery=kept-bottom] .tile')]"
                           ".map(t => t.dataset.key)")
    assert top == ["k007", "k006", "k005", "k004"] and bottom == ["k000", "k001", "k002", "k003"]

    groups = page.evaluate("Object.fromEntries([...document.querySelectorAll('.group')].map("
                           "g => [g.dataset.group, [...g.querySelectorAll('.tile')].map(t => t.dataset.key)]))")
    assert groups == {"k000": ["k000", "d000", "d001"], "k001": ["k001", "d002"]}
    assert page.evaluate("document.querySelectorAll('.group img').length") == 5  # originals from the tars

    shot = page.screenshot(tmp_path / "dataset-report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_entry_point_draws_configured_thresholds(curated_dir, browser):
    cmd = [sys.executable, str(ROOT / "curation" / "report"), str(curated_dir),
           "--set", "curation.aesthetic.threshold=6.5", "--set", "curation.min_tier=2k"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(curated_dir / "report.html")
    page = browser(curated_dir / "report.html")
    assert page.errors == []
    settings = dict(page.evaluate("[...document.querySelectorAll('table[data-table=thresholds] tr')].slice(1)"
                                  ".map(r => [r.cells[0].textContent, r.cells[1].textContent])"))
    assert settings["aesthetic.threshold"] == "6.5 (on)"
    assert settings["min_tier"] == "2k"


def test_entry_point_dry_run_and_bad_folder(curated_dir, tmp_path):
    cmd = [sys.executable, str(ROOT / "curation" / "report")]
    done = subprocess.run([*cmd, str(curated_dir), "--dry-run"], capture_output=True, text=True, env=ENV,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"shards": 2' in done.stdout and not (curated_dir / "report.html").exists()
    done = subprocess.run([*cmd, str(tmp_path / "nowhere")], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and "nowhere" in done.stderr and len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize("value,expected", [(3, "00003.tar"), ("00003", "00003.tar"), ("00003.tar", "00003.tar"),
                                            ("shards/00003.tar", "00003.tar"), (None, None), (float("nan"), None)])
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
    rows = [{"key": f"r{i}", "reason": "too_small" if i < 4 else "low_quality", "src": str(src),
             "offset": off, "size": size} for i, (off, size) in enumerate(places)]
    rows.append({"key": "gone", "reason": "http_404", "src": "", "offset": 0, "size": 0})  # never downloaded
    curdir = tmp_path / "cur"
    assert save_rejected_thumbnails(curdir, rows, per_reason=2) == 4
    assert sorted(p.stem for p in (curdir / "thumbs").iterdir()) == ["r0", "r1", "r4", "r5"]
    with Image.open(thumb_path(curdir, "r0")) as im:
        assert im.size == (256, 128) and im.getpixel((128, 64))[2] > 150  # the right bytes, downscaled
    assert save_rejected_thumbnails(curdir, rows, per_reason=2) == 0  # rerun: nothing new
