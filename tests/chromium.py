"""Headless Chromium driven over the DevTools protocol (CDP), for the tests of every HTML page we write.

The browser is Debian's `chromium` (`make test` installs it when missing and running as root);
where it is absent the tests skip with a reason naming the fix. A `Page` collects console errors,
uncaught exceptions and failed resource loads from the moment it starts loading; it navigates,
evaluates JavaScript, clicks and types with real input events, and takes screenshots.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--remote-debugging-port=0", "--window-size=1280,1600"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    return None


class Page:
    """One browser tab: navigate, collect errors, evaluate, click, type, screenshot."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(ws_url, max_size=None, open_timeout=20))
        self.next_id = 0
        self.events: list[dict] = []
        self.errors: list[str] = []
        for domain in ("Runtime", "Log", "Page"):
            self.send(f"{domain}.enable")

    def send(self, method: str, timeout: float = 60.0, **params) -> dict:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline, method)
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"CDP {method}: {msg['error']}")
                return msg["result"]
            if "method" in msg:
                self.events.append(msg)

    def _recv(self, deadline: float, waiting_for: str) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"CDP: no answer to {waiting_for}")
        msg = json.loads(self.ws.recv(timeout=left))
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                      for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(f"exception: {details.get('text', '')} "
                               f"{details.get('exception', {}).get('description', '')}".strip())
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}")
        return msg

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._recv(deadline, method))

    def load(self, action: Callable[[], object], timeout: float = 60.0) -> None:
        """Run `action` (navigate, click, reload, key) and wait for the load event of the page it causes
        (all embedded images decoded)."""
        self.events.clear()
        action()
        self.wait_event("Page.loadEventFired", timeout)

    def goto(self, url: str) -> None:
        self.load(lambda: self.send("Page.navigate", url=url))

    def open(self, path: Path) -> None:
        """A file, as a person opens a report copied off a cluster (file://, no server)."""
        self.goto(Path(path).resolve().as_uri())

    def reload(self) -> None:
        self.load(lambda: self.send("Page.reload", ignoreCache=True))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluate {expression!r}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (press + release)."""
        box = self.evaluate(f"(() => {{const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                            "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def key(self, key: str, code: str, keycode: int) -> None:
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=keycode)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def broken_images(self) -> int:
        return self.evaluate("[...document.images].filter(i => !i.complete || i.naturalWidth === 0).length")

    def close(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Callable[[], Page]]:
    """A headless Chromium for the block; yields `new_page()` -> a blank Page (closed at the end)."""
    exe = find_chromium()
    if exe is None:
        pytest.skip("chromium not installed: run `make chromium` as root (apt-get install chromium) "
                    "to check the HTML pages in a real browser")
    pytest.importorskip("websockets", reason="websockets (test extra) drives Chromium over CDP")
    proc = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    pages: list[Page] = []
    try:
        port_file, deadline = Path(profile) / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"chromium ({exe}) did not start (exit status {proc.poll()})")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])

        def new_page() -> Page:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
            target = json.loads(opener.open(req, timeout=20).read())
            pages.append(Page(target["webSocketDebuggerUrl"]))
            return pages[-1]

        yield new_page
    finally:
        for page in pages:
            page.close()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
