"""Header rules for forwarding, as pure functions over raw ASGI header lists. Imports nothing from the package.

ASGI servers hand over header names lower-cased, as bytes. Hop-by-hop headers (RFC 9110 7.6.1) and
every header named in ``Connection`` are dropped in both directions; the token header is replaced,
never appended; ``Host`` is left to the client library, which sets the upstream's own host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

RawHeaders = Sequence[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",  # non-standard, still sent by old clients
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Request headers the sidecar sets itself or must not pass: Host is the upstream's; Expect would make the
# client library wait for a 100 Continue that API Gateway may never send; X-Forwarded-* are rebuilt, and
# Forwarded and X-Real-IP (which would contradict them, and which some backends believe) are dropped.
_REQUEST_OWN = frozenset(
    {b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"x-real-ip"}
)


# Connection values that list no other header (nearly every request's): no need to parse them.
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})


def _listed(value: bytes) -> set[bytes]:
    """The header names a ``Connection`` value lists (each is hop-by-hop for this message)."""
    return {part.strip().lower() for part in value.split(b",")} - {b""}


def upstream_request_headers(
    raw: RawHeaders,
    *,
    replaced: frozenset[bytes],
    set_headers: Sequence[tuple[str, str]],
    client_host: str | None,
    scheme: str,
) -> list[tuple[str, str]]:
    """The headers to send upstream for a client request with headers ``raw`` (one pass over them).

    Incoming headers named in ``replaced`` (lower-cased: the token header, the API key) are dropped and
    ``set_headers`` are added, so a client can never send its own value alongside the sidecar's.
    """
    out: list[tuple[str, str]] = []
    listed: set[bytes] = set()
    forwarded_for: list[str] = []
    original_host = ""
    for name, value in raw:
        if name in HOP_BY_HOP or name in replaced:
            if name == b"connection" and value not in _PLAIN_CONNECTION:
                listed |= _listed(value)
            continue
        if name in _REQUEST_OWN:
            if name == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
            elif name == b"host":
                original_host = value.decode("latin-1")
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if listed - HOP_BY_HOP:
        drop = {name.decode("latin-1") for name in listed}
        out = [(name, value) for name, value in out if name not in drop]
        if b"x-forwarded-for" in listed:
            forwarded_for.clear()
        if b"host" in listed:
            original_host = ""
    out.extend(set_headers)
    if client_host:
        forwarded_for.append(client_host)
    if forwarded_for:
        out.append(("x-forwarded-for", ", ".join(forwarded_for)))
    out.append(("x-forwarded-proto", scheme))
    if original_host:
        out.append(("x-forwarded-host", original_host))
    return out


# The request id the client gets back is the sidecar's (the one it sent upstream and logged), as Envoy's
# always_set_request_id_in_response does: an upstream's own is dropped.
_RESPONSE_OWN = HOP_BY_HOP | {b"x-request-id"}


# API Gateway's id for a request: REST APIs send x-amzn-RequestId, HTTP APIs apigw-requestid.
GATEWAY_REQUEST_IDS = frozenset({b"x-amzn-requestid", b"apigw-requestid"})


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The upstream's response headers minus hop-by-hop ones and ``X-Request-Id``, names lower-cased (repeated
    headers such as Set-Cookie kept apart), and API Gateway's request id (``GATEWAY_REQUEST_IDS``; empty if
    none). One pass; a second only when ``Connection`` names a header that is not hop-by-hop anyway."""
    out: list[tuple[bytes, bytes]] = []
    listed: set[bytes] = set()
    gateway_id = b""
    for name, value in raw:
        lower = name.lower()
        if lower in _RESPONSE_OWN:
            if lower == b"connection" and value not in _PLAIN_CONNECTION:
                listed |= _listed(value)
            continue
        if lower in GATEWAY_REQUEST_IDS:
            gateway_id = value
        out.append((lower, value))
    if listed - HOP_BY_HOP:
        return [(name, value) for name, value in out if name not in listed], gateway_id
    return out, gateway_id


def request_body_length(raw: RawHeaders) -> int | None:
    """The announced body size: 0 for none, ``None`` when it streams without a length (chunked). ``ValueError``
    for a Content-Length that is not plain digits (``5 `` with trailing whitespace passes the parser, and the
    upstream client fails on it)."""
    for name, value in raw:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            if not value.isdigit():
                raise ValueError(value)
            return int(value)
    return 0
