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
# client library wait for a 100 Continue that API Gateway may never send; X-Forwarded-* are rebuilt.
_REQUEST_OWN = frozenset({b"host", b"expect", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def connection_listed(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Names listed in ``Connection`` headers (they are hop-by-hop for this message)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(part.strip().lower() for part in value.split(b",") if part.strip())
    return frozenset(names)


def upstream_request_headers(
    raw: RawHeaders,
    *,
    token_header: bytes,
    token_value: bytes,
    client_host: str | None,
    scheme: str,
    extra: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[str, str]]:
    """The headers to send upstream for a client request with headers ``raw``.

    ``token_header`` is the lower-cased name of the header that carries the token; any incoming value is
    replaced. ``extra`` headers (lower-cased names) are set, replacing incoming ones of the same name.
    """
    listed = connection_listed(raw) if any(name == b"connection" for name, _ in raw) else frozenset()
    replaced = {token_header, *(name for name, _ in extra)}
    out: list[tuple[str, str]] = []
    forwarded_for: list[str] = []
    original_host = ""
    for name, value in raw:
        if name in HOP_BY_HOP or name in listed or name in replaced:
            continue
        if name in _REQUEST_OWN:
            if name == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
            elif name == b"host":
                original_host = value.decode("latin-1")
            continue
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    out.append((token_header.decode("latin-1"), token_value.decode("latin-1")))
    for name, value in extra:
        out.append((name.decode("latin-1"), value.decode("latin-1")))
    if client_host:
        forwarded_for.append(client_host)
    if forwarded_for:
        out.append(("x-forwarded-for", ", ".join(forwarded_for)))
    out.append(("x-forwarded-proto", scheme))
    if original_host:
        out.append(("x-forwarded-host", original_host))
    return out


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers minus hop-by-hop ones; repeated headers (Set-Cookie) are kept apart."""
    headers = list(raw)
    listed = connection_listed(headers)
    return [
        (name.lower(), value)
        for name, value in headers
        if name.lower() not in HOP_BY_HOP and name.lower() not in listed
    ]


def request_body_length(raw: RawHeaders) -> int | None:
    """The announced body size: 0 for none, ``None`` when it streams without a length (chunked) or is unreadable."""
    for name, value in raw:
        if name == b"transfer-encoding":
            return None
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return 0
