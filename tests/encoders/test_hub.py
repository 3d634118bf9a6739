"""Where a model comes from (encoders/hub.py): with the hub unreachable every miss is one line naming the
model, the key and the ways out, within seconds; a cached model loads offline; a reachable hub is used."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest
from huggingface_hub import constants

from encoders import hub
from shards.errors import SigmaError

WAYS = ("--profile demo", "HF_HUB_OFFLINE=1", "--set models.t5=")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty HF cache, no probe remembered, and the offline switches restored afterwards."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(hub, "_probed", {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    return tmp_path / "hub"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_offline_and_not_cached_is_one_line(fresh, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SigmaError) as e:
        hub.require("google/t5-v1_1-xxl", "models.t5", what="T5 tokenizer")
    text = one_line(e)
    assert text.startswith("models.t5: T5 tokenizer google/t5-v1_1-xxl: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE is set" in text and all(w in text for w in WAYS), text
    with pytest.raises(SigmaError) as e:  # a flag names the model: the local path goes to the flag
        hub.require("owner/pipe", "--pipeline", what="diffusers pipeline")
    assert "(--pipeline /models/...)" in one_line(e) and "--set --pipeline" not in one_line(e)


def test_an_unreachable_hub_is_one_line_within_seconds(fresh, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    start = time.monotonic()
    with pytest.raises(SigmaError) as e:
        hub.require("stabilityai/sdxl-vae", "models.vae", what="VAE")
    text = one_line(e)
    assert "models.vae: VAE stabilityai/sdxl-vae" in text and "unreachable" in text and "127.0.0.1" in text
    with pytest.raises(SigmaError):  # the probe is remembered: no second wait
        hub.require("google/t5-v1_1-xxl", "models.t5")
    assert time.monotonic() - start < 15


def test_a_cached_model_is_read_offline_when_the_hub_is_unreachable(fresh, monkeypatch):
    snapshot = fresh / "models--owner--name" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (fresh / "models--owner--name" / "refs").mkdir()
    (fresh / "models--owner--name" / "refs" / "main").write_text("a" * 40)
    assert hub.available("owner/name") and hub.cached("owner/name", "a" * 40) and not hub.cached("owner/name", "b" * 40)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    hub.require("owner/name", "models.t5")
    assert constants.HF_HUB_OFFLINE is True and hub.offline()  # the client (and Ray's workers) read the cache


def test_a_reachable_hub_is_left_to_download_as_always(fresh, monkeypatch):
    class Head(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Head)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        hub.require("google/t5-v1_1-xxl", "models.t5")  # not cached, hub up: from_pretrained downloads it
        assert not hub.offline()
    finally:
        server.shutdown()


def test_paths_and_clip_tags(fresh, monkeypatch, tmp_path):
    with pytest.raises(SigmaError) as e:
        hub.require(str(tmp_path / "missing"), "models.vae")
    assert one_line(e) == f"models.vae: file not found: {tmp_path / 'missing'}"
    assert hub.is_path("sac+logos+ava1-l14-linearMSE.pth") and not hub.is_path("Qwen/Qwen2.5-VL-7B-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SigmaError) as e:
        hub.require_clip("ViT-L-14-quickgelu", "openai")
    text = one_line(e)
    assert text.startswith("models.clip.weights: open_clip ViT-L-14-quickgelu 'openai' weights") and "timm/" in text
    with pytest.raises(SigmaError, match="neither a file nor an open_clip pretrained tag"):
        hub.require_clip("ViT-L-14-quickgelu", "no-such-tag")
