"""Fixtures for training/evaluate: two tiny runs, one evaluated folder, headless Chromium over CDP."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["A red fox in the snow.", "A lighthouse on a cliff at sunset.", "A small cactus with a happy face."]
SEEDS = "0,1"
SIZE = "64x64"
STEPS = "2"


def evaluate(*args, timeout=240):
    """The real entry point, as the README runs it (demo profile: the tiny offline models)."""
    cmd = [sys.executable, str(ROOT / "training" / "evaluate"), "--profile", "demo", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two 'runs' with different random weights: a run folder in training/finetune's layout (the
    newest step's EMA weights are read; its name is a stage) and a bare checkpoint file."""
    from training import checkpoint
    from training.model import DiT_models

    root = tmp_path_factory.mktemp("runs")
    step = lambda n: checkpoint.step_dir(root / "512", n)  # noqa: E731
    files = [step(5) / checkpoint.EMA, step(10) / checkpoint.MODEL, step(10) / checkpoint.EMA, root / "tuned.safetensors"]
    for seed, path in enumerate(files):
        torch.manual_seed(seed)
        model = DiT_models["tiny"]()
        for p in model.parameters():  # the zero-initialised output layers would make every image alike
            torch.nn.init.normal_(p, std=0.05)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return [root / "512", files[-1]]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def evaluate_cli():
    return evaluate


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return path


@pytest.fixture(scope="session")
def evaldir(tmp_path_factory, tiny_models, runs, prompts_file):
    """One evaluation of both runs, shared by the tests that read its output."""
    out = tmp_path_factory.mktemp("eval")
    r = evaluate("--runs", *runs, "--prompts", prompts_file, "--out", out, "--size", SIZE, "--seeds", SEEDS,
                 "--steps", STEPS, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------
# Headless Chromium, driven over the DevTools protocol
# ---------------------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0", "--window-size=1200,900"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


class Browser:
    """One page of a headless Chromium: navigate, evaluate JS, click with real mouse events."""

    def __init__(self, binary: str, profile: Path):
        from websockets.sync.client import connect

        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        port_file, deadline = profile / "DevToolsActivePort", time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        import urllib.request

        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30))
        self.next_id, self.events = 0, []
        self.call("Page.enable")
        self.call("Runtime.enable")

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30):
        deadline = time.time() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(json.loads(self.ws.recv(timeout=max(0.1, deadline - time.time()))))

    def load(self, action):
        """Run `action` (navigate, click, reload, key) and wait for the page it causes to load."""
        self.events.clear()
        action()
        self.wait_event("Page.loadEventFired")

    def goto(self, url: str):
        self.load(lambda: self.call("Page.navigate", url=url))

    def reload(self):
        self.load(lambda: self.call("Page.reload", ignoreCache=True))

    def js(self, expression: str):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def click(self, selector: str):
        """A real mouse click at the centre of the element (press + release)."""
        box = self.js(f"(() => {{const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                      "const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def key(self, key: str, code: str, keycode: int):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=keycode)

    def close(self):
        if hasattr(self, "stack"):
            self.stack.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not found (Debian: apt-get install chromium); the preference page needs a real browser")
    pytest.importorskip("websockets", reason="websockets (test extra) drives Chromium over CDP")
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        b = Browser(binary, Path(profile))
        try:
            yield b
        finally:
            b.close()
