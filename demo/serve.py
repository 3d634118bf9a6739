"""A loopback HTTP server for a folder of images, plus the faults real crawls meet.

    with ImageServer("demo-out/images") as srv:
        srv.url                      # http://127.0.0.1:PORT  (files: srv.url + "/name.jpg")
        srv.fault_urls()             # {"http_404": ..., "timeout": ..., "not_an_image": ..., ...}
        srv.max_inflight             # most requests in flight at once (politeness checks)

Routes: `/NAME` serves the file; `/delay/MS/NAME` serves it after MS milliseconds; `/hold/NAME`
serves it once `release()` is called (tests that must act while a download is in flight);
`/fault/404`; `/fault/slow.jpg` (waits `slow_s` before answering, past any sane timeout);
`/fault/html.jpg` (an HTML page served as image/jpeg); `/fault/truncated.jpg` (the first half
of a real JPEG); `/fault/huge.png` (a valid PNG header declaring 100000 x 100000 pixels);
`/fault/noai.jpg` (a real JPEG with `X-Robots-Tag: noai`). `refused_url()` points at a closed port.
`add(path, *responses)` scripts a route: each request gets the next response (the last repeats), a
`(status, headers, body)` tuple or a callable writing its own (`trickle`, `endless`). `log` has one
entry per request (path, monotonic time, user agent, bytes of body sent): the evidence tests read.

`link_mbps` caps the bytes/s of all responses together, as the network link of a crawling node
does (loopback alone moves gigabytes per second: downloading would cost nothing; benchmarks).
"""

from __future__ import annotations

import io
import mimetypes
import socket
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

HTML = b"<!doctype html><html><head><title>Not found</title></head><body>gone</body></html>\n"


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A structurally valid PNG whose header declares width x height (the pixel data is tiny)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def sample_jpeg(width: int = 1024, height: int = 1024) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((width, height), 64).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


class ImageServer:
    """Start on enter (or `start()`), stop on exit (or `stop()`); port chosen by the OS."""

    def __init__(
        self, folder: str | Path, slow_s: float = 30.0, host: str = "127.0.0.1", link_mbps: float | None = None
    ):
        self.folder = Path(folder).resolve()
        self.slow_s = slow_s
        self.host = host
        self.link_bytes_per_s = link_mbps * 1e6 / 8 if link_mbps else None
        self._link_free_at = 0.0  # monotonic time at which the shared link has sent what was queued
        self.inflight = 0
        self.max_inflight = 0
        self.requests: list[str] = []
        self.log: list[dict] = []
        self.routes: dict[str, list] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._release = threading.Event()
        jpeg = sample_jpeg()
        self.faults = {
            "/fault/html.jpg": (200, {"Content-Type": "image/jpeg"}, HTML),
            "/fault/truncated.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) // 2]),
            "/fault/huge.png": (200, {"Content-Type": "image/png"}, huge_png()),
            "/fault/noai.jpg": (200, {"Content-Type": "image/jpeg", "X-Robots-Tag": "noai"}, jpeg),
        }
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    def fault_urls(self) -> dict[str, str]:
        """One URL per fault, keyed by the reason code curation should give it."""
        u = self.url
        return {
            "http_404": f"{u}/fault/404",
            "timeout": f"{u}/fault/slow.jpg",
            "not_an_image": f"{u}/fault/html.jpg",
            "truncated": f"{u}/fault/truncated.jpg",
            "decompression_bomb": f"{u}/fault/huge.png",
            "opt_out": f"{u}/fault/noai.jpg",
            "connection_error": refused_url(),
        }

    def start(self) -> ImageServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with server._lock:
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                    server.requests.append(self.path)
                    self.entry = {
                        "path": self.path,
                        "time": time.monotonic(),
                        "sent": 0,
                        "user_agent": self.headers.get("User-Agent", ""),
                    }
                    server.log.append(self.entry)
                self.in_flight = True
                try:
                    server._answer(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    server._leave(self)

        self._httpd = ThreadingHTTPServer((self.host, 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def add(self, path: str, *responses) -> str:
        """Script `path` (see the module docstring); returns its URL."""
        self.routes[path] = list(responses)
        return self.url + path

    def paths(self) -> list[str]:
        """The paths requested so far, in order."""
        with self._lock:
            return [e["path"] for e in self.log]

    def release(self) -> None:
        """Answer every `/hold/` request, now and from now on."""
        self._release.set()

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ImageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _answer(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        if path in self.routes:
            with self._lock:
                script = self.routes[path]
                answer = script.pop(0) if len(script) > 1 else script[0]
            return answer(self, h) if callable(answer) else self._send(h, *answer)
        if path in self.faults:
            return self._send(h, *self.faults[path])
        if path == "/fault/slow.jpg":
            self._stop.wait(self.slow_s)
            return self._send(h, 200, {"Content-Type": "image/jpeg"}, b"")
        if path.startswith("/hold/"):
            self._release.wait()
            path = path[len("/hold") :]
        if path.startswith("/delay/"):
            _, _, ms, path = path.split("/", 3)
            time.sleep(int(ms) / 1000)
            path = "/" + path
        file = (self.folder / path.lstrip("/")).resolve()
        if self.folder not in file.parents or not file.is_file():
            return self._send(h, 404, {"Content-Type": "text/html"}, HTML)
        kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(h, 200, {"Content-Type": kind}, file.read_bytes())

    def _leave(self, h: BaseHTTPRequestHandler) -> None:
        """Count a request out once. `_send` does it before the body goes out: a client that has read
        the whole body may send its next request before this thread returns from writing it."""
        with self._lock:
            if getattr(h, "in_flight", False):
                self.inflight -= 1
                h.in_flight = False

    def _send(self, h: BaseHTTPRequestHandler, code: int, headers: dict, body: bytes) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        self._leave(h)
        chunk = 64 * 1024
        for i in range(0, len(body), chunk):
            self._pace(min(chunk, len(body) - i))
            h.wfile.write(body[i : i + chunk])
            h.entry["sent"] += min(chunk, len(body) - i)

    def _pace(self, n: int) -> None:
        """With a link cap, wait until the shared link has room for n more bytes (chunks interleave
        across connections, so concurrent downloads share the bandwidth)."""
        if self.link_bytes_per_s is None:
            return
        with self._lock:
            start = max(time.monotonic(), self._link_free_at)
            self._link_free_at = start + n / self.link_bytes_per_s
            wait = start - time.monotonic()
        if wait > 0:
            time.sleep(wait)


def trickle(bytes_per_s: float = 1.0, declared: int = 1_000_000):
    """A response declaring `declared` bytes, then sending one byte every 1/bytes_per_s seconds."""

    def answer(server: ImageServer, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/jpeg")
        h.send_header("Content-Length", str(declared))
        h.end_headers()
        server._leave(h)
        for _ in range(declared):
            if server._stop.wait(1 / bytes_per_s):
                return
            h.wfile.write(b"x")
            h.wfile.flush()
            h.entry["sent"] += 1

    return answer


def endless(declared: int | None = None, chunk: int = 1 << 20):
    """A body that never ends until the client hangs up, with no Content-Length or a false one."""

    def answer(server: ImageServer, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "image/png")
        h.send_header("Connection", "close")
        if declared is not None:
            h.send_header("Content-Length", str(declared))
        h.end_headers()
        server._leave(h)
        block = b"\0" * chunk
        while not server._stop.is_set():
            h.wfile.write(block)
            h.entry["sent"] += chunk

    return answer


def refused_url() -> str:
    """A URL on a loopback port nobody listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/refused.jpg"
