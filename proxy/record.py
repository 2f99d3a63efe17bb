"""One request's record: its id, and what happened to it, filled in as it goes and read once at the end by the
access log and the metrics. Imports nothing from the package.

The request id is the client's ``X-Request-Id`` when it sent a sane one (``SANE_REQUEST_ID``: what fits
in a log line and a header unquoted), else a new one. It goes upstream, back to the client, into every log
line written while the request is handled (``CURRENT_REQUEST_ID``, a context variable: uvicorn runs each
request in its own task) and into the sidecar's own error bodies.
"""

from __future__ import annotations

import random
import re
from contextvars import ContextVar
from dataclasses import dataclass

REQUEST_ID_HEADER = b"x-request-id"
# UUIDs, ULIDs, hex, base64 and the ids of common proxies and load balancers; nothing that needs quoting in a
# log line or JSON, nothing longer than a log line should carry.
SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,128}")
# Methods counted under their own name in metrics; any other is counted as "other" (labels stay bounded).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

CURRENT_REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")

# Not for secrets: an id must be unique, not unpredictable, and this is four times cheaper than os.urandom.
_random = random.Random()  # noqa: S311


def new_request_id() -> str:
    """32 hex digits (128 random bits, as a UUID has)."""
    return f"{_random.getrandbits(128):032x}"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-Id`` if it is sane, else a new id."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


@dataclass(slots=True)
class RequestRecord:
    """What the access log and the metrics need of one request.

    ``source`` is "upstream" once the upstream's answer is being relayed, else "sidecar"; ``error`` the sidecar's
    error code when it answered (or cut the answer off) itself; ``status`` 0 while nothing was sent.
    ``upstream_seconds`` is the time spent waiting for the upstream's answer head (summed over a replay), None
    when nothing was sent upstream; ``upstream_request_id`` API Gateway's id for the request
    (``x-amzn-RequestId``, or ``apigw-requestid`` for HTTP APIs), kept only when it matches ``SANE_REQUEST_ID``
    (log lines carry it unescaped).
    """

    request_id: str
    route: str = "none"
    status: int = 0
    source: str = "sidecar"
    error: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_seconds: float | None = None
    upstream_request_id: str = ""

    @property
    def status_class(self) -> str:
        """``2xx`` and so on, or ``none`` when the client left before an answer began."""
        return f"{self.status // 100}xx" if self.status else "none"


__all__ = [
    "CURRENT_REQUEST_ID",
    "KNOWN_METHODS",
    "REQUEST_ID_HEADER",
    "RequestRecord",
    "new_request_id",
    "request_id_of",
]
