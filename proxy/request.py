"""One request's record: its id, and what happened to it, filled in as it goes and read once at the end by the
access log and the metrics. Imports nothing from the package.

The request id is the client's ``X-Request-Id`` when it sent a sane one (``SANE_REQUEST_ID``: what fits
in a log line and a header unquoted), else a new one. It goes upstream, back to the client, into every log
line written while the request is handled (``CURRENT_REQUEST_ID``, a context variable: uvicorn runs each
request in its own task) and into the sidecar's own error bodies.
"""

from __future__ import annotations

import itertools
import os
import random
import re
from contextvars import ContextVar

REQUEST_ID_HEADER = b"x-request-id"
# UUIDs, ULIDs, hex, base64 and the ids of common proxies and load balancers; nothing that needs quoting in a
# log line or JSON, nothing longer than a log line should carry.
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")
# A request's route in logs and metrics, besides the configured prefixes: the sidecar's own /-/ routes, and
# none when it was refused before a route was chosen.
OWN_ROUTE = "/-/"
NO_ROUTE = "none"

CURRENT_REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")

# New ids are this process's random 64-bit prefix and a counter: unique across processes and restarts, not
# unpredictable (an id is no secret), and three times cheaper than 128 random bits per request.
_PREFIX = f"{random.SystemRandom().getrandbits(64):016x}"
_COUNTER = itertools.count(1)


def _new_process() -> None:
    """A forked worker is a process of its own: its own prefix (else the workers' ids would be the same)."""
    global _PREFIX, _COUNTER
    _PREFIX = f"{random.SystemRandom().getrandbits(64):016x}"
    _COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_new_process)


def new_request_id() -> str:
    """32 hex digits, like a W3C trace id: the process's prefix, then its request count."""
    return f"{_PREFIX}{next(_COUNTER):016x}"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` if it is sane, else a new id (``new_request_id``, inline: every request)."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_PREFIX}{next(_COUNTER):016x}"


class RequestRecord:
    """What the access log and the metrics need of one request.

    ``source`` is "upstream" once the upstream's answer is being relayed, else "sidecar"; ``error`` the sidecar's
    error code when it answered (or cut the answer off) itself; ``status`` 0 while nothing was sent.
    ``upstream_seconds`` is the time spent waiting for the upstream's answer head (summed over a replay), None
    when nothing was sent upstream; ``upstream_request_id`` API Gateway's id for the request
    (``x-amzn-RequestId``, or ``apigw-requestid`` for HTTP APIs), kept only when it matches ``SANE_REQUEST_ID``
    (log lines carry it unescaped).
    """

    # Plain class attributes as defaults: the one instance attribute set at creation is the id, and a field is
    # stored on the instance only when a request changes it (a third cheaper to create than a slots dataclass).
    route: str = NO_ROUTE
    status: int = 0
    source: str = "sidecar"
    error: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float | None = None
    upstream_request_id: str = ""
    # The request's trace (32 hex digits) when tracing is on, for the access line and the histograms' exemplars.
    trace_id: str = ""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


__all__ = [
    "CURRENT_REQUEST_ID",
    "NO_ROUTE",
    "OWN_ROUTE",
    "REQUEST_ID_HEADER",
    "RequestRecord",
    "new_request_id",
    "request_id_of",
]
