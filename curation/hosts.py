"""Per-host scheduling for one download shard: polite to each host, never stalled by one.

img2dataset's Downloader hands each row of a shard to a thread of its pool and writes whatever
`(key, bytes, error)` comes back, under the key returned. So the thread need not fetch the row it
was handed: `Scheduler.take()` gives it *any* URL of the shard whose host has a free slot and is
not backing off, and returns that URL's final result. A URL waiting for its host's turn holds no
thread; a thread waits only when no URL of the shard can start at all (every remaining host busy
or backing off), so one slow host never delays the others.

Slots are node-wide: a request holds one of its host's `per_domain_limit` byte-range locks in a
file shared by every download process of the run on this node (`Slots`), so the limit holds
across processes without dividing it between them. Hosts are counted by normalised name (`host_key`).

Retries: no retry for a 4xx other than 408/429, nor for a refused address, a cap or an opt-out.
429/503 back the whole host off for `Retry-After` seconds (capped at `max_retry_after`; beyond
it, or out of retries, the URL ends as `http_429`/`http_503`); other transient errors (timeouts,
resets, 5xx) are retried after a jittered exponential backoff. Waiting is the URL's, not a thread's.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import io
import os
import random
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from curation import fetch, robots
from shards import reasons

BACKOFF_BASE = 0.5  # seconds before the first retry of a transient error; doubles each attempt, +-50% jitter
IDLE_POLL = 0.05  # seconds a thread with nothing to start waits before looking again (slots of other processes)
MAX_LIMIT = 256  # most slots a host may have (curation.download.per_domain_limit is checked against it)
NO_RETRY = {reasons.BLOCKED_ADDRESS, reasons.TOO_LARGE, reasons.OPT_OUT, reasons.TOO_MANY_REDIRECTS}


def host_key(url: str) -> str:
    """The host a URL counts against: lower case, IDNA, no trailing dot, one spelling per IP address."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass
    try:
        return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, host))
    except OSError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(host))  # 127.1, 2130706433, 0x7f000001 -> 127.0.0.1
    except OSError:
        return host


@dataclass
class Item:
    key: int  # img2dataset's row index in the shard
    url: str
    host: str
    attempts: int = 0
    not_before: float = 0.0


class Slots:
    """`limit` slots per host, as byte-range locks in one file shared by this node's download processes.

    Open-file-description locks (Linux `F_OFD_SETLK`): owned by the file descriptor, so two threads
    of one process exclude each other as two processes do, and a crashed process's slots are freed
    with its descriptors. Host h's slots are bytes k*MAX_LIMIT + [0, limit) with k a 48-bit hash of
    h: no file per host, and no two hosts share slots in practice.
    """

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = Path(path), limit
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def acquire(self, host: str) -> int | None:
        """An open file descriptor holding one of the host's slots, or None if all are taken."""
        base = int.from_bytes(hashlib.sha1(host.encode()).digest()[:6], "big") * MAX_LIMIT
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        for i in range(self.limit):
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, base + i, 1, 0))
                return fd
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
        os.close(fd)
        return None

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # closing the descriptor drops its lock


class Scheduler:
    """All URLs of one shard; img2dataset's threads call `take()` once per row."""

    def __init__(
        self,
        urls: list[str],
        policy: fetch.Policy,
        slots: Slots,
        retries: int,
        max_retry_after: float,
        robots_txt: bool,
        rules: dict,
    ):
        self.policy, self.slots, self.retries, self.max_retry_after = policy, slots, retries, max_retry_after
        self.robots_txt, self.rules = robots_txt, rules  # rules: origin -> robots.Rules, shared by the process
        self.queues: dict[str, collections.deque] = {}
        for key, url in enumerate(urls):
            host = host_key(url)
            self.queues.setdefault(host, collections.deque()).append(Item(key, url, host))
        self.order = collections.deque(self.queues)  # hosts with queued URLs, round robin
        self.host_free_at: dict[str, float] = {}  # 429/503 backoff
        self.inflight: collections.Counter = collections.Counter()  # this process's requests per host
        self.fetching: set[str] = set()  # origins whose robots.txt is being read
        self.unreachable: dict[str, robots.Rules] = {}  # robots.txt failures: for this shard only
        self.cv = threading.Condition()
        self.failure: str | None = None  # the first exception a thread met (a bug), for the shard's error
        self.reasons: dict[int, str] = {}  # row -> reason code of each URL that ended without bytes

    def take(self) -> tuple[int, io.BytesIO | None, str | None]:
        """Fetch some URL of the shard to its final outcome; img2dataset's (key, stream, error)."""
        try:
            return self._take()
        except Exception as e:  # a bug: img2dataset only prints it, so keep it for the shard's error
            self.failure = f"{type(e).__name__}: {e}"
            raise

    def _take(self) -> tuple[int, io.BytesIO | None, str | None]:
        while True:
            item, fd, read_robots = self._next()
            try:
                result = self._attempt(item, read_robots)
            finally:
                Slots.release(fd)
                with self.cv:
                    self.inflight[item.host] -= 1
                    self.cv.notify_all()
            if self._settle(item, result):
                if result.body is None:
                    self.reasons[item.key] = result.reason  # the code as data; img2dataset keeps the message
                return item.key, (io.BytesIO(result.body) if result.body is not None else None), result.error

    def _next(self) -> tuple[Item, int, bool]:
        """Block until some queued URL may start; take a slot of its host."""
        with self.cv:
            while True:
                now, wake = time.monotonic(), IDLE_POLL
                for _ in range(len(self.order)):
                    host = self.order[0]
                    self.order.rotate(-1)
                    q = self.queues[host]
                    item = q[0]
                    start = max(item.not_before, self.host_free_at.get(host, 0.0))
                    org = robots.origin(item.url)
                    if start > now:
                        wake = min(wake, start - now)
                        continue
                    if org in self.fetching:  # its robots.txt is on the way; notified when it is in
                        continue
                    fd = self.slots.acquire(host) if self.inflight[host] < self.slots.limit else None
                    if fd is None:  # all its slots busy, here or in another process of the node
                        continue
                    self.inflight[host] += 1
                    q.popleft()
                    if not q:
                        del self.queues[host]
                        self.order.pop()  # the host just rotated to the right end
                    read_robots = self.robots_txt and self._rules(org) is None
                    if read_robots:
                        self.fetching.add(org)
                    return item, fd, read_robots
                self.cv.wait(wake)

    def _attempt(self, item: Item, read_robots: bool) -> fetch.Result:
        if self.robots_txt:
            org = robots.origin(item.url)
            if read_robots:
                try:
                    r = fetch.fetch(
                        robots.rules_url(item.url), self.policy, max_bytes=robots.ROBOTS_MAX_BYTES, opt_out=False
                    )
                    rules = robots.parse_rules(r.body, r.status, r.reason, r.detail)
                finally:
                    with self.cv:
                        self.fetching.discard(org)
                (self.unreachable if rules.failure else self.rules)[org] = rules
            refusal = self._rules(org).refusal(item.url, self.policy.tokens)
            if refusal:
                return fetch.Result(reason=refusal[0], detail=refusal[1], final=True)
        return fetch.fetch(item.url, self.policy)

    def _rules(self, org: str) -> robots.Rules | None:
        """This origin's robots.txt verdict, if known and under a day old (RFC 9309 2.4)."""
        rules = self.unreachable.get(org) or self.rules.get(org)
        return rules if rules is not None and time.monotonic() - rules.at < robots.MAX_AGE else None

    def _settle(self, item: Item, result: fetch.Result) -> bool:
        """True if `result` is final; else requeue the URL after its backoff."""
        if result.body is not None or result.final or item.attempts >= self.retries or result.reason in NO_RETRY:
            return True
        status = result.status
        if 400 <= status < 500 and status not in (408, 429):
            return True
        now = time.monotonic()
        if status in (429, 503):
            wait = result.retry_after if result.retry_after is not None else _jitter(item.attempts)
            if wait > self.max_retry_after:
                return True
            with self.cv:
                self.host_free_at[item.host] = max(self.host_free_at.get(item.host, 0.0), now + wait)
        else:
            item.not_before = now + _jitter(item.attempts)
        item.attempts += 1
        with self.cv:
            if item.host not in self.queues:
                self.queues[item.host] = collections.deque()
                self.order.append(item.host)
            self.queues[item.host].append(item)
            self.cv.notify_all()
        return False


def _jitter(attempt: int) -> float:
    return BACKOFF_BASE * 2**attempt * random.uniform(0.5, 1.5)
