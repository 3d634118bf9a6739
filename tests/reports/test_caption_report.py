"""The caption report, rendered in headless Chromium from real caption parquets and curated tars."""

from __future__ import annotations

import pytest

from shards.errors import SigmaError


def test_caption_report_renders_in_chromium(caption_run, browser, tmp_path):
    from captioning.report import write_caption_report

    curdir, capdir = caption_run
    out = write_caption_report(capdir, shards=str(curdir / "shards"))
    assert out == capdir / "report.html"
    page = browser(out)
    assert page.errors == []
    assert page.broken_images() == 0
    plots = page.evaluate("[...document.querySelectorAll('figure.plot')].map(f => f.dataset.plot)")
    assert plots == ["tokens", "chars", "alt-chars"]
    summary = dict(
        page.evaluate(
            "[...document.querySelectorAll('table[data-table=summary] tr')].slice(1)"
            ".map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
    )
    assert summary["captions"] == "8" and summary["failed"] == "1"
    assert summary["over 300 T5 tokens (truncated at encode)"] == "2"
    assert summary["share truncated"] == "25.0%"
    examples = page.evaluate(
        "[...document.querySelectorAll('.example')].map(e => "
        "[e.dataset.key, !!e.querySelector('img'), !!e.querySelector('.tokens.over'), "
        "e.querySelector('.original').textContent])"
    )
    assert [e[0] for e in examples] == ["a000", "a001", "a002", "a003", "a004", "b000", "b001", "b002"]
    assert all(e[1] for e in examples)  # every example shows its image from the curated tar
    assert [e[0] for e in examples if e[2]] == ["b001", "b002"]  # 301 and 420 tokens
    assert examples[0][3] == "alt text: alt a000"
    assert page.evaluate("document.querySelector('[data-gallery=examples]').dataset.count") == "8"
    failed = page.evaluate(
        "[...document.querySelectorAll('table[data-table=failed-rows] tr')].slice(1)"
        ".map(r => r.cells[0].textContent + ':' + r.cells[2].textContent)"
    )
    assert failed == ["b003:caption_error"]
    shot = page.screenshot(tmp_path / "caption-report.png")
    assert shot.stat().st_size > 20_000


def test_caption_report_without_shards_is_text_only(caption_run, browser):
    from captioning.report import write_caption_report

    _, capdir = caption_run
    page = browser(write_caption_report(capdir, token_budget=100))
    assert page.errors == []
    assert page.evaluate("document.querySelectorAll('.example img').length") == 0
    assert page.evaluate("document.querySelectorAll('.example').length") == 8
    assert page.evaluate("document.querySelectorAll('.tokens.over').length") == 5  # 150, 240, 299, 301, 420


def test_caption_report_needs_caption_files(tmp_path):
    from captioning.report import write_caption_report

    with pytest.raises(SigmaError, match="no caption files"):
        write_caption_report(tmp_path)
