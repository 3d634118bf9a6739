"""Headless Chromium driven by Playwright, for the tests of every HTML page we write.

The browser is Debian's `chromium` (`make test` installs it when missing and running as root),
launched by Playwright through `executable_path`: Playwright's own browser download is never used.
Where chromium or playwright is absent the tests skip with a reason naming the fix. A `Page`
collects console errors, uncaught exceptions and failed resource loads from the moment it starts
loading; it navigates, evaluates JavaScript, clicks and types with real input events, and takes
screenshots.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Playwright adds --headless and its own automation flags; these keep the browser off the network.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
VIEWPORT = {"width": 1280, "height": 1600}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    return None


class Page:
    """One browser tab: navigate, collect errors, evaluate, click, type, screenshot."""

    def __init__(self, page: Any):
        self.page = page
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.errors.append(f"exception: {e.name}: {e.message}".strip()))
        page.on("requestfailed", lambda r: self.errors.append(f"log: failed to load {r.url} ({r.failure})"))

    def _console(self, msg: Any) -> None:
        if msg.type in ("error", "assert"):
            self.errors.append(f"console: {msg.text}")

    def load(self, action: Callable[[], object], timeout: float = 60.0) -> None:
        """Run `action` (navigate, click, reload, key) and wait for the load event of the page it causes
        (all embedded images decoded)."""
        with self.page.expect_event("load", timeout=timeout * 1000):
            action()

    def goto(self, url: str) -> None:
        self.page.goto(url, wait_until="load")

    def open(self, path: Path) -> None:
        """A file, as a person opens a report copied off a cluster (file://, no server)."""
        self.goto(Path(path).resolve().as_uri())

    def reload(self) -> None:
        self.page.reload(wait_until="load")

    def evaluate(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (scrolled into view; press + release)."""
        self.page.click(selector)

    def key(self, key: str, code: str = "", keycode: int = 0) -> None:
        """A real key press (down + up); `code` and `keycode` are kept for the callers of the CDP harness."""
        self.page.keyboard.press(key)

    def screenshot(self, path: Path) -> Path:
        self.page.screenshot(path=str(path), full_page=True)
        return Path(path)

    def broken_images(self) -> int:
        return int(self.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length"))

    def close(self) -> None:
        self.page.close()


_DRIVER: dict[str, Any] = {"users": 0}  # one Playwright driver per process: its sync API allows one per thread


@contextlib.contextmanager
def _playwright(sync_api: Any) -> Iterator[Any]:
    """The process's Playwright driver, started by its first user and stopped after its last (a session's
    browser and a test's own browser are open at the same time)."""
    if _DRIVER["users"] == 0:
        _DRIVER["manager"] = sync_api.sync_playwright()
        _DRIVER["driver"] = _DRIVER["manager"].__enter__()
    _DRIVER["users"] += 1
    try:
        yield _DRIVER["driver"]
    finally:
        _DRIVER["users"] -= 1
        if _DRIVER["users"] == 0:
            _DRIVER.pop("manager").__exit__(None, None, None)


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Callable[[], Page]]:
    """A headless Chromium for the block; yields `new_page()` -> a blank Page (closed at the end)."""
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "chromium not installed: run `make chromium` as root (apt-get install chromium) "
            "to check the HTML pages in a real browser"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (test extra) drives Chromium")
    with _playwright(sync_api) as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=exe,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport=VIEWPORT,
            proxy=None,
            timeout=60_000,
        )
        try:
            yield lambda: Page(context.new_page())
        finally:
            context.close()
