"""Which client a request comes from, for the rate limit (``service.rate_limit``) and for
who may read the operational routes (``OPS_ALLOW``, :func:`allowed`).

The client is the connection's peer, unless that peer is a trusted proxy (``TRUSTED_PROXIES``):
then ``X-Forwarded-For`` is read from the right, past every trusted proxy, and the first
address that is not one is the client. A client can write anything into ``X-Forwarded-For``,
so only what trusted proxies appended is believed, and an entry that is not an IP address ends
the walk at the last hop that was.

The result is an address as :mod:`ipaddress` writes it, never raw header text, so it is safe in
a Redis key and bounded in length. An IPv6 client is its /64 network: one subscriber is
usually given a whole /64, and limiting each of its 2**64 addresses would limit nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable

from pipeline.settings import Network

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
#: The client of a request whose peer is not an IP address (a Unix socket).
UNKNOWN = "unknown"


def _parse(text: str) -> Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.partition(":")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _label(address: Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))  # drops any %zone
    return str(address)


class ClientResolver:
    """Finds a request's client address, trusting ``X-Forwarded-For`` from ``trusted``
    proxies only. What it learns of each peer is remembered (peers repeat: the few proxies in
    front, or the same clients), so a signup pays a dictionary lookup, not a parse."""

    def __init__(self, trusted: Iterable[Network], cache_size: int = 4096) -> None:
        self._trusted = tuple(trusted)
        self._peer = functools.lru_cache(maxsize=cache_size)(self._look_at_peer)

    def _is_trusted(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)

    def _look_at_peer(self, peer: str | None) -> tuple[Address | None, str, bool]:
        """The peer's address, its label, and whether it is a trusted proxy."""
        address = _parse(peer) if peer else None
        if address is None:
            return None, UNKNOWN, False
        return address, _label(address), self._is_trusted(address)

    def __call__(self, peer: str | None, forwarded_for: Callable[[], list[str]]) -> str:
        """The client of a request from ``peer``, as a label; ``forwarded_for`` gives its
        ``X-Forwarded-For`` values, and is called only when ``peer`` is a trusted proxy."""
        return self.resolve(peer, forwarded_for)[1]

    def resolve(
        self, peer: str | None, forwarded_for: Callable[[], list[str]]
    ) -> tuple[Address | None, str]:
        """The client's address (None: a peer without one, as a Unix socket's) and label."""
        address, label, trusted = self._peer(peer)
        if not trusted:
            return address, label
        found: Address | None = None
        hops = [hop for value in forwarded_for() for hop in value.split(",")]
        for hop in reversed(hops):
            parsed = _parse(hop)
            if parsed is None:
                break
            found = parsed
            if not self._is_trusted(parsed):
                break
        return (address, label) if found is None else (found, _label(found))


def allowed(address: Address | None, networks: Iterable[Network]) -> bool:
    """Whether the client ``address`` is inside one of ``networks`` (an IPv4-mapped IPv6
    address counts as its IPv4 one). A client without an address (a Unix socket's) is not."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and any(address in network for network in networks)
