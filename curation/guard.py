"""Address guard: a URL from the web may only reach globally routable addresses.

A URL list is untrusted input and a crawl runs inside a network that can reach what the web must
not (cloud metadata at 169.254.169.254, cluster services, loopback). So every connection resolves
its host once, refuses any address that is not globally routable unless an operator-allowed
network (`curation.download.allow_networks`) contains it, and connects to that very address (no
second DNS lookup between check and connect: no DNS rebinding). Redirects open new connections,
so each hop is checked the same way. Numeric spellings (`127.1`, `2130706433`, `0x7f000001`) are
resolved by the system resolver to the address they mean, and that address is what is checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence

from shards import reasons

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv4 embedded in the last 32 bits


class Blocked(OSError):
    """A refused address (`reason` is its code, `detail` says which and why)."""

    reason = reasons.BLOCKED_ADDRESS

    def __init__(self, host: str, address: str, why: str):
        self.detail = f"{host} -> {address} ({why})"
        super().__init__(f"{self.reason}: {self.detail}")


def networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    """Parsed `allow_networks`; a bad entry raises ValueError naming it."""
    out = []
    for c in cidrs:
        try:
            out.append(ipaddress.ip_network(c, strict=True))
        except ValueError as e:
            raise ValueError(f"{c!r} is not a CIDR network ({e})") from None
    return tuple(out)


def refusal(address: str, allow: Sequence[Network] = ()) -> str | None:
    """Why `address` may not be contacted ('loopback', 'private', ...), or None if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if any(ip.version == n.version and ip in n for n in allow):
        return None
    if ip.version == 6:
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if inner is None and ip in NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if inner is not None:
            why = refusal(str(inner), allow)
            return f"embeds {inner}: {why}" if why else None
    for name in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return None if ip.is_global else "not globally routable"


def connect(host: str, port: int, timeout: float | None, allow: Sequence[Network] = ()) -> socket.socket:
    """A TCP connection to the first allowed address of `host`; Blocked if none is allowed.

    The peer address is checked once more after connecting: what was checked is what we talk to.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, addr in infos:
        why = refusal(addr[0], allow)
        if why:
            error = error or Blocked(host, addr[0], why)
            continue
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
            peer = sock.getpeername()[0]
            why = refusal(peer, allow)
            if why:
                raise Blocked(host, peer, why)
            return sock
        except OSError as e:
            sock.close()
            if isinstance(e, Blocked) or not isinstance(error, Blocked):
                error = e
    raise error or OSError(f"{host}: no address")
