"""One HTTP(S) request as a crawler may make it: guarded addresses, capped size, one deadline.

img2dataset fetches with `urllib.request.urlopen`; this module gives urllib an opener of its own
instead of the default one: only the http(s) handlers (no ftp:, file:, data:, no proxies from the
environment, which would bypass the guard), connections through `guard.connect`, at most
`MAX_REDIRECTS` redirects and only to http(s). A request has one total deadline (`max_seconds`:
connect + headers + body): a watchdog thread shuts the socket down when it passes, so a server
that trickles a byte a second cannot hold a thread for longer. A declared `Content-Length` above
`max_bytes` is refused before the body is read; a body that grows past it is cut. `X-Robots-Tag`
opt-outs are read from the headers, before the body. The result is data: bytes, or a reason code
with a detail for people (the code is never parsed back out of a message). Credentials in a URL
(`http://user:pass@host/`) are dropped before the request: the host is what gets checked.
"""

from __future__ import annotations

import email.utils
import functools
import http.client
import socket
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass

from curation import guard, robots
from shards import reasons

MAX_REDIRECTS = 3
CHUNK = 64 * 1024
WATCHDOG_TICK = 0.05  # seconds: how late past its deadline a request may be stopped


@dataclass(frozen=True)
class Policy:
    """What every request of a crawl obeys (built once from `curation.download`)."""

    user_agent: str
    timeout: float  # per network operation (connect, one read)
    max_seconds: float  # total per request
    max_bytes: int
    allow: tuple  # guard.Network objects an operator allows besides the global internet
    tokens: tuple[str, ...]  # our names in X-Robots-Tag / robots.txt ("sigmaforge", "img2dataset")
    directives: frozenset  # X-Robots-Tag directives that opt out ("noai", "noimageai", "none", ...)


@dataclass
class Result:
    body: bytes | None = None
    reason: str | None = None  # a shards.reasons code when body is None
    detail: str = ""  # what happened, for people (img2dataset's error_message)
    status: int = 0  # HTTP status when one was received
    retry_after: float | None = None  # seconds, from a Retry-After header
    final: bool = False  # no retry can change it (a refusal decided before any request)

    @property
    def error(self) -> str | None:
        """The message img2dataset records for a failed row: "reason: detail"."""
        return None if self.reason is None else f"{self.reason}: {self.detail}"


def fetch(url: str, policy: Policy, max_bytes: int | None = None, opt_out: bool = True) -> Result:
    """GET `url` under `policy`; never raises for what the network or the server does."""
    limit = policy.max_bytes if max_bytes is None else max_bytes
    deadline = time.monotonic() + policy.max_seconds
    req = urllib.request.Request(
        without_credentials(url), headers={"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.5"}
    )
    with _watch(deadline) as watch:
        try:
            with _opener(policy.allow).open(req, timeout=min(policy.timeout, policy.max_seconds)) as r:
                return _response(r, policy, limit, deadline, opt_out)
        except urllib.error.HTTPError as e:
            e.close()
            if 300 <= e.code < 400:
                return Result(
                    reason=reasons.TOO_MANY_REDIRECTS, detail=f"more than {MAX_REDIRECTS} redirects", status=e.code
                )
            return Result(
                reason=reasons.http_reason(e.code),
                detail=str(e.reason),
                status=e.code,
                retry_after=retry_after(e.headers.get("Retry-After")),
            )
        except Exception as e:  # noqa: BLE001 - any failure of one request is that URL's reason
            return _describe(e, watch.expired or time.monotonic() >= deadline, policy)


def without_credentials(url: str) -> str:
    """`url` without `user:pass@` (whose `:` would otherwise be read as the port separator)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _response(r, policy: Policy, limit: int, deadline: float, opt_out: bool) -> Result:
    """A 2xx response: opt-out and declared size from the headers, then the capped body."""
    tags = r.headers.get_all("X-Robots-Tag") or []
    if opt_out and robots.header_opts_out(tags, policy.tokens, policy.directives):
        return Result(reason=reasons.OPT_OUT, detail=f"X-Robots-Tag {', '.join(tags)}", status=r.status)
    declared = r.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        return Result(
            reason=reasons.TOO_LARGE, detail=f"Content-Length {declared} > max_bytes {limit}", status=r.status
        )
    body = _read(r, limit, deadline)
    if body is None:
        return Result(reason=reasons.TOO_LARGE, detail=f"body passed max_bytes {limit}", status=r.status)
    return Result(body=body, status=r.status)


def _describe(e: BaseException, late: bool, policy: Policy) -> Result:
    inner = e.reason if isinstance(e, urllib.error.URLError) and isinstance(e.reason, BaseException) else e
    if isinstance(inner, (guard.Blocked, Refused)):
        return Result(reason=inner.reason, detail=inner.detail)
    if late or isinstance(inner, (socket.timeout, TimeoutError)):
        return Result(
            reason=reasons.TIMEOUT, detail=f"past max_seconds {policy.max_seconds:g} or timeout {policy.timeout:g}"
        )
    return Result(reason=reasons.CONNECTION, detail=f"{type(inner).__name__}: {inner}")


def _read(r, limit: int, deadline: float) -> bytes | None:
    """The body, or None once it passes `limit` bytes (never more than limit + one chunk in memory)."""
    buf = bytearray()
    while True:
        chunk = r.read1(CHUNK)
        if not chunk:
            if time.monotonic() >= deadline:
                raise TimeoutError("deadline")
            if r.length:  # the server closed before Content-Length bytes came
                raise http.client.IncompleteRead(bytes(buf[-16:]), r.length)
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            return None
        if time.monotonic() >= deadline:
            raise TimeoutError("deadline")


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


# ---------------------------------------------------------------------------------------------
# urllib plumbing: guarded connections, redirects, the deadline watchdog
# ---------------------------------------------------------------------------------------------


class Refused(OSError):
    """A redirect a crawler must not follow (`reason` is its code)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _HTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, allow=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.allow = allow

    def connect(self):
        self.sock = _track(guard.connect(self.host, self.port, self.timeout, self.allow))


class _HTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, allow=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.allow = allow

    def connect(self):
        sock = _track(guard.connect(self.host, self.port, self.timeout, self.allow))
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow):
        super().__init__()
        self.allow = allow

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, allow=self.allow), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow):
        super().__init__(context=ssl.create_default_context())
        self.allow = allow

    def https_open(self, req):
        return self.do_open(functools.partial(_HTTPSConnection, allow=self.allow), req, context=self._context)


class _Redirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def http_error_302(self, req, fp, code, msg, headers):
        # urllib refuses a non-http(s) target itself, as an HTTPError with the 3xx code, which would
        # read as too_many_redirects: refuse it first, as the blocked address it is
        target = headers.get("location") or headers.get("uri")
        if target:
            try:
                self._check(urllib.parse.urljoin(req.full_url, target))
            except Refused:
                fp.close()
                raise
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self._check(newurl)
        return super().redirect_request(req, fp, code, msg, headers, without_credentials(newurl))

    @staticmethod
    def _check(newurl: str) -> None:
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            raise Refused(reasons.BLOCKED_ADDRESS, f"redirect to {scheme or 'no'} scheme ({newurl[:80]})")


@functools.lru_cache(maxsize=8)
def _opener(allow: Sequence) -> urllib.request.OpenerDirector:
    """http(s) only, no proxies, guarded connections: nothing else reaches the network."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _HTTPHandler(allow),
        _HTTPSHandler(allow),
        _Redirects(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(handler)
    return opener


class _Request:
    def __init__(self, deadline: float):
        self.deadline, self.socks, self.expired = deadline, [], False


_local = threading.local()
_active: set[_Request] = set()
_active_lock = threading.Lock()
_watchdog: list[threading.Thread] = []


class _watch:
    """Context: sockets opened in this thread are shut down once `deadline` passes."""

    def __init__(self, deadline: float):
        self.request = _Request(deadline)

    def __enter__(self) -> _Request:
        _local.request = self.request
        with _active_lock:
            _active.add(self.request)
            if not _watchdog:
                _watchdog.append(threading.Thread(target=_watch_loop, name="fetch-deadlines", daemon=True))
                _watchdog[0].start()
        return self.request

    def __exit__(self, *exc) -> None:
        _local.request = None
        with _active_lock:
            _active.discard(self.request)


def _track(sock: socket.socket) -> socket.socket:
    request = getattr(_local, "request", None)
    if request is not None:
        with _active_lock:
            request.socks.append(sock)
    return sock


def _watch_loop() -> None:
    while True:
        time.sleep(WATCHDOG_TICK)
        now = time.monotonic()
        with _active_lock:
            late = [r for r in _active if r.deadline <= now and not r.expired]
            for r in late:
                r.expired = True
                for s in r.socks:
                    try:
                        s.shutdown(socket.SHUT_RDWR)  # a blocked recv/send returns at once
                    except OSError:
                        pass
