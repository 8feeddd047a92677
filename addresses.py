"""The client's address, as the service logs, records and throttles it: parsed, in its canonical
form, never as it came (a proxy header may hold anything)."""

from __future__ import annotations

import ipaddress

from starlette.types import Scope

UNKNOWN = "unknown"  # no peer address (a Unix socket), or one that is not an IP address


def canonical(host: str) -> str:
    """`2001:DB8::1` and `2001:db8:0:0::1` are one address: its canonical text (an IPv4 address
    mapped into IPv6 as the IPv4 one). Anything that is not an address is UNKNOWN."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return UNKNOWN
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if address.scope_id is not None:  # fe80::1%eth0: an interface name of the client's own
            return str(ipaddress.IPv6Address(address.packed))
    return str(address)


def client_address(scope: Scope) -> str:
    """The request's client (uvicorn's, which is X-Forwarded-For's only when the peer is in
    FORWARDED_ALLOW_IPS), canonical."""
    client = scope.get("client")
    return canonical(client[0]) if client else UNKNOWN


def throttle_key(address: str) -> str:
    """What the throttle counts by: an IPv4 address, or an IPv6 address's /64 (one subscriber's
    network: each of its 2^64 addresses is as easy to use as the next)."""
    if ":" not in address:
        return address
    return str(ipaddress.IPv6Network((address, 64), strict=False))
