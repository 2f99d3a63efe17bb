"""Addresses: ``SIDECAR_LISTEN`` values (``host:port``, ``[::1]:8080`` for IPv6, or ``unix:/path``) and whether a
peer is in a set of networks. Standard library only, so the healthcheck can read them without importing the
settings machinery."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

_HOST_PORT = re.compile(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})")


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``host:port`` and check both parts; raises ``ValueError`` saying what is expected."""
    match = _HOST_PORT.fullmatch(value.strip())
    if not match:
        raise ValueError(
            "must be host:port, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080, or unix:/path/to/sidecar.sock"
        )
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ValueError("port must be 0-65535")
    return host, port


def peer_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as an IP (an IPv4-mapped IPv6 address as the IPv4 one); None when it is not an IP."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    """Whether ``address`` is in one of ``networks`` (an IPv4-mapped IPv6 address counts as IPv4)."""
    ip = peer_ip(address)
    return ip is not None and any(ip in network for network in networks)


__all__ = ["in_networks", "parse_listen", "peer_ip"]
