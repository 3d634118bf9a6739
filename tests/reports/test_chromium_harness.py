"""The browser harness itself: it must see the errors the report tests assert are absent."""

from __future__ import annotations


def test_harness_reports_console_errors_exceptions_and_missing_files(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!doctype html><html><body><img src="missing.png">'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>'
    )
    page = browser(bad)
    text = "\n".join(page.errors)
    assert "console: boom" in text
    assert "undefinedFunction" in text
    assert "missing.png" in text  # a file the page needs but that is not there
    assert page.broken_images() == 1


def test_harness_clean_page_and_screenshot(browser, tmp_path):
    good = tmp_path / "good.html"
    good.write_text("<!doctype html><html><body><h1 id=t>fine</h1></body></html>")
    page = browser(good)
    assert page.errors == [] and page.evaluate("document.getElementById('t').textContent") == "fine"
    assert page.screenshot(tmp_path / "good.png").read_bytes()[:4] == b"\x89PNG"
