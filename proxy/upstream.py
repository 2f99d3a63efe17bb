"""How the sidecar talks to an upstream, as values (like httpx's ``Timeout`` and ``Limits``): its timeouts and its
limits, each default beside its reason. Imports nothing from the package."""

from __future__ import annotations

from dataclasses import dataclass

# API Gateway gives up on an integration after 29 s; waiting a little longer lets its own 504 reach the client.
DEFAULT_READ_TIMEOUT = 30.0
# A TCP connect on a healthy network takes milliseconds; a few seconds means the upstream is unreachable.
DEFAULT_CONNECT_TIMEOUT = 5.0
# Upstream connections kept and opened at once; one legacy host rarely needs more.
DEFAULT_MAX_CONNECTIONS = 100
# How long a request may wait for a free upstream connection: a slow upstream then turns into quick 504s
# instead of an ever-growing queue.
DEFAULT_POOL_TIMEOUT = 5.0
# A request body larger than this gets 413: API Gateway's payload limit is 10 MB.
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Timeouts:
    """``connect``: a TCP (and TLS) handshake; ``read``: every wait for upstream bytes, the status line included,
    and a stall in the client's request body; ``pool``: the whole wait for a connection, a free pooled one or a
    new one. Seconds."""

    connect: float = DEFAULT_CONNECT_TIMEOUT
    read: float = DEFAULT_READ_TIMEOUT
    pool: float = DEFAULT_POOL_TIMEOUT


@dataclass(frozen=True, slots=True)
class Limits:
    """``max_connections``: upstream connections kept and opened at once; ``max_body_bytes``: the largest request
    body (0: no limit)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


__all__ = ["Limits", "Timeouts"]
