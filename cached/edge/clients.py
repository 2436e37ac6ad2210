"""Who a client is, for the limits that count clients (issue 13 item 6).

- **The key a client is counted under** (:meth:`Clients.key`): an IPv4 address as it is (an
  IPv4-mapped IPv6 address too), an IPv6 address by its ``/client_ipv6_prefix`` network
  (default /64: a host is normally given a /64 and may use any address in it, so counting
  exact addresses would give it 2^64 allowances).
- **Trusted proxies** (``trusted_proxies``: addresses or networks, e.g. the controllers'
  HAProxy): a connection from one of them carries many clients. It is not held to the
  per-address connection cap (only to the global one), and a request on it is counted as
  the client that ``X-Forwarded-For`` names: the rightmost address in it that is not itself
  a trusted proxy (nginx's ``real_ip_recursive``). From anyone else ``X-Forwarded-For`` is
  ignored, since any client can send one. The PROXY protocol is not spoken.

:class:`Clients` is immutable, built once from the configuration and shared by the
connection guard (``cached/edge/connguard.py``) and the pass-through
(``cached/edge/passthrough.py``);
any thread may read it. Each of those two owns a :class:`Holdings` of its own (the counts
per client), changed on the event loop only.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from cached.config import Network, parse_networks  # (re-exported: parsed with the config)

if TYPE_CHECKING:
    from cached.config import Config


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Clients:
    """How clients are told apart (see the module docstring)."""

    ipv6_prefix: int = 64
    trusted: tuple[Network, ...] = ()

    @classmethod
    def of(cls, config: Config) -> Clients:
        return cls(config.client_ipv6_prefix, parse_networks(config.trusted_proxies))

    def key(self, address: str | None) -> str | None:
        """The key ``address`` is counted under; None for a Unix-socket caller (never
        counted)."""
        if not address:
            return None
        ip = _ip(address)
        if ip is None:
            return address
        if isinstance(ip, ipaddress.IPv6Address) and self.ipv6_prefix < 128:
            return str(ipaddress.IPv6Network((ip, self.ipv6_prefix), strict=False))
        return str(ip)

    def is_trusted(self, address: str | None) -> bool:
        """Whether ``address`` is one of the ``trusted_proxies``."""
        if not address or not self.trusted:
            return False
        ip = _ip(address)
        return ip is not None and any(ip in network for network in self.trusted)

    def address_of(self, request: web.BaseRequest) -> str | None:
        """The client's address: the peer's, or behind a trusted proxy the one it names."""
        peer = request.remote
        if not self.is_trusted(peer):
            return peer
        hops = [
            h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")
        ]
        for hop in reversed(hops):
            if _ip(hop) is None:
                break  # not an address: nothing left of it can be believed
            if not self.is_trusted(hop):
                return hop
        return peer

    def key_of(self, request: web.BaseRequest) -> str | None:
        """The key the client of ``request`` is counted under."""
        return self.key(self.address_of(request))


class Holdings:
    """How many of something (connections, upstream requests) each client key holds now.
    Changed by one event loop's callbacks and tasks only."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def take(self, key: str, limit: int) -> bool:
        """One more for ``key``; False (and nothing taken) if it holds ``limit`` already."""
        count = self.counts.get(key, 0)
        if count >= limit:
            return False
        self.counts[key] = count + 1
        return True

    def give(self, key: str) -> None:
        """One fewer for ``key`` (forgotten at none)."""
        count = self.counts.get(key, 0) - 1
        if count > 0:
            self.counts[key] = count
        else:
            self.counts.pop(key, None)


__all__ = ["Clients", "Holdings", "Network", "parse_networks"]
