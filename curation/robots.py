"""Site owners' opt-outs: `X-Robots-Tag` response headers and robots.txt.

`X-Robots-Tag: noai, noimageai` (or `none`) applies to every crawler; `X-Robots-Tag: sigmaforge:
noai` (or `img2dataset: noai`, since this toolkit downloads through img2dataset) only to us, and a
directive addressed to another user agent (`otherbot: noai`) is not ours to honour. Within one
header value, a `name:` prefix applies to the directives after it (Google's documented form).

robots.txt (RFC 9309) is read once per origin (scheme + host + port) per worker process, reused for
up to a day, and honoured for either of our tokens: a 2xx is parsed, a 4xx means no rules (RFC 9309
2.3.1.3), and a server error or an unreachable host means "do not crawl" (2.3.1.4): that origin's
URLs in the shard get the robots.txt request's reason.
Python's `urllib.robotparser` does prefix matching only (no `*` / `$` wildcards in paths).
"""

from __future__ import annotations

import time
import urllib.robotparser
from collections.abc import Iterable
from urllib.parse import urlsplit

from shards import reasons

# directives that take a value after a colon: `unavailable_after: 2030-01-01`, `max-image-preview: large`
VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}
ROBOTS_MAX_BYTES = 500 * 1024  # RFC 9309 2.5: parse at least the first 500 KiB
MAX_AGE = 24 * 3600  # seconds a robots.txt verdict is reused (RFC 9309 2.4: cache no longer than 24 h)


def header_opts_out(values: Iterable[str], tokens: Iterable[str], directives: Iterable[str]) -> bool:
    """True if any X-Robots-Tag value carries one of `directives` for everyone or for one of `tokens`."""
    tokens = {t.lower() for t in tokens}
    directives = {d.lower() for d in directives}
    for value in values:
        agent = None  # None: applies to every user agent
        for part in value.split(","):
            name, sep, rest = part.partition(":")
            name = name.strip().lower()
            if sep and name not in VALUED:
                agent, part = name, rest
            if (agent is None or agent in tokens) and part.strip().lower() in directives:
                return True
    return False


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


class Rules:
    """The robots.txt verdict for one origin."""

    def __init__(
        self, parser: urllib.robotparser.RobotFileParser | None = None, failure: tuple[str, str] | None = None
    ):
        self.parser, self.failure = parser, failure  # failure: (reason code, detail) of the robots.txt request
        self.at = time.monotonic()

    def refusal(self, url: str, tokens: Iterable[str]) -> tuple[str, str] | None:
        """None if `url` may be fetched, else (reason code, detail)."""
        if self.failure:
            return self.failure[0], f"{self.failure[1]} (robots.txt)"
        if self.parser is not None:
            for token in tokens:
                if not self.parser.can_fetch(token, url):
                    return reasons.OPT_OUT, f"robots.txt disallows {token}"
        return None


def rules_url(url: str) -> str:
    """Where `url`'s origin keeps its robots.txt."""
    return origin(url) + "/robots.txt"


def parse_rules(body: bytes | None, status: int, reason: str | None, detail: str) -> Rules:
    """The verdict from the robots.txt response (fetched by the caller through `fetch.fetch`, so
    guarded and capped at ROBOTS_MAX_BYTES): its body, its HTTP status, or why it failed."""
    if body is not None:
        parser = urllib.robotparser.RobotFileParser()
        parser.parse(body.decode("utf-8", "replace").splitlines())
        return Rules(parser)
    if 400 <= status < 500 and status != 429:
        return Rules()
    if reason == reasons.TOO_LARGE:  # a robots.txt over the cap: RFC 9309 lets us parse the first 500 KiB; rare
        return Rules()
    return Rules(failure=(reason or reasons.DOWNLOAD_ERROR, detail))
