"""Fixtures every stage's tests share: the tiny offline models, the demo config, a local Ray.

Stage-specific fixtures live in tests/<stage>/conftest.py.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: only the tests that will run count
def pytest_collection_modifyitems(session, config, items):
    from tests import venvs

    venvs.start(items)


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """The tiny random-weight models, built once (deterministic) into .cache/tiny."""
    from demo import tiny_models

    return tiny_models.build(ROOT / ".cache" / "tiny")


@pytest.fixture(scope="session")
def demo_cfg(tiny_models):
    from common import config

    return config.load(ROOT / "pipelines.yaml", "demo")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard)."""
    import ray

    from common import config, ray_start

    ray_start.init_ray(config.load(ROOT / "pipelines.yaml", "demo"))
    yield ray
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(bytes) -> a folder on its own tmpfs of that size: a real full disk (ENOSPC).
    Mounting needs root (CI and this machine run as root); elsewhere the test is skipped."""
    import subprocess

    mounts: list[Path] = []

    def make(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounts)}"
        folder.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounts.append(folder)
        return folder

    yield make
    for folder in mounts:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture(scope="session")
def shard_models(tmp_path_factory) -> dict[str, Path]:
    """The tiny T5 and VAE, built by the builders the demo uses (fixed seeds): tests/encoders, tests/encoding."""
    from encoders import t5, vae

    root = tmp_path_factory.mktemp("models")
    return {"t5": t5.build_tiny(root / "t5"), "vae": vae.build_tiny(root / "vae")}


# --- a real S3 API on loopback -------------------------------------------------------------------
# The endpoint and the test's credentials are set when this file is imported, before any Ray starts, so
# every Ray worker inherits them exactly as a cluster node inherits its environment (or its role).
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


S3_SECRET = "sigmaforge-test-secret-7f3a9c"  # tests grep every output for it
os.environ.setdefault("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "sigmaforge-test-key")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", S3_SECRET)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


_SERVER: list[CountingEndpoint] = []  # the session's S3 server, for s3_counted


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 at AWS_ENDPOINT_URL (as moto's ThreadedMotoServer serves it: real
    HTTP, the real S3 wire protocol), recording each request it serves (`s3_counted`)."""
    from urllib.parse import urlsplit

    server = CountingEndpoint(urlsplit(os.environ["AWS_ENDPOINT_URL"]).port)
    _SERVER.append(server)
    yield os.environ["AWS_ENDPOINT_URL"]
    _SERVER.remove(server)
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket for one test: its s3:// URL (no trailing slash)."""
    import re

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "b"
    name = f"t-{name}-{os.getpid() % 10000}"
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    if fs.exists(name):
        fs.rm(name, recursive=True)
    fs.mkdir(name)
    return f"s3://{name}"


SLOWDOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""


class CountingEndpoint:
    """moto's S3 server (its WSGI app, as ThreadedMotoServer serves it) on 127.0.0.1, recording each request."""

    def __init__(self, port: int | None = None) -> None:
        import threading

        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.requests: list[tuple[str, str, str]] = []  # (method, path, query), in arrival order
        self.faults: list[tuple[str, str, str]] = []  # (method, path part, how): the next matching requests fail

        def counted(environ, start_response):
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            self.requests.append((method, path, environ["QUERY_STRING"]))
            fault = next((f for f in self.faults if f[0] == method and f[1] in path), None)
            if fault is None:
                return app(environ, start_response)
            self.faults.remove(fault)
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))  # the body, as a server would
            if fault[2] == "drop":  # the connection closed with no answer (a restarted load balancer)
                environ["werkzeug.socket"].shutdown(socket.SHUT_RDWR)
                start_response("500 Dropped", [])  # written to a closed socket: nothing arrives
                return []
            start_response("503 Slow Down", [("Content-Type", "application/xml")])
            return [SLOWDOWN]

        self._server = make_server("127.0.0.1", port or _free_port(), counted, True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, method: str, times: int, how: str = "slowdown", path: str = "") -> None:
        """The next `times` requests of `method` (whose path contains `path`) fail: `slowdown` answers 503
        SlowDown (S3's throttling), `drop` closes the connection unanswered."""
        self.faults += [(method, path, how)] * times

    def count(self, method: str | None = None, path: str = "") -> int:
        """Requests (of one method) whose path contains `path`."""
        return sum(1 for m, p, _ in self.requests if (method is None or m == method) and path in p)

    def writes(self) -> list[tuple[str, str, str]]:
        return [r for r in self.requests if r[0] in ("PUT", "POST", "DELETE")]

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()


@pytest.fixture
def s3_counted(s3_server):
    """The requests the S3 server serves during this test, from any process (Ray workers' too): `.requests`
    (method, path, query), `.count(method, path)`, `.writes()`; `.url` is the endpoint."""
    server = _SERVER[0]
    server.requests.clear()
    server.faults.clear()
    yield server
    server.faults.clear()
