"""Header rules over raw header lists: no server."""

from __future__ import annotations

import re

import pytest

from proxy.headers import downstream_response_headers, request_body_length, upstream_request_headers


def raw(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in pairs]


def upstream(*pairs: tuple[str, str], client_host: str | None = "10.0.0.5") -> list[tuple[str, str]]:
    return upstream_request_headers(
        raw(*pairs),
        replaced=frozenset({b"authorization", b"x-api-key"}),
        set_headers=[("authorization", "<token>")],
        client_host=client_host,
        scheme="http",
    )


def test_the_token_header_is_the_sidecars_alone():
    out = upstream(("authorization", "Bearer client-own"), ("x-api-key", "k"), ("accept", "*/*"))
    assert out.count(("authorization", "<token>")) == 1
    assert ("authorization", "Bearer client-own") not in out
    assert all(name != "x-api-key" for name, _ in out)
    assert ("accept", "*/*") in out


def test_hop_by_hop_and_connection_listed_headers_are_dropped():
    out = upstream(("connection", "keep-alive, x-private"), ("x-private", "1"), ("keep-alive", "5"), ("te", "x"))
    names = [name for name, _ in out]
    assert not {"connection", "x-private", "keep-alive", "te"} & set(names)


def test_forwarding_headers_are_rebuilt_from_what_the_client_sent():
    out = dict(upstream(("host", "localhost:8080"), ("x-forwarded-for", "192.0.2.1")))
    assert out["x-forwarded-for"] == "192.0.2.1, 10.0.0.5"
    assert out["x-forwarded-proto"] == "http"
    assert out["x-forwarded-host"] == "localhost:8080"
    assert "host" not in out  # the upstream's own Host is aiohttp's to set
    listed = dict(upstream(("connection", "x-forwarded-for, host"), ("x-forwarded-for", "192.0.2.1"), ("host", "h")))
    assert listed["x-forwarded-for"] == "10.0.0.5"
    assert "x-forwarded-host" not in listed


def test_response_headers_keep_repeats_apart_and_lose_hop_by_hop_ones():
    out, gateway_id = downstream_response_headers(
        raw(
            ("Set-Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("Connection", "close, X-Hop"),
            ("X-Hop", "1"),
            ("Transfer-Encoding", "chunked"),
            ("X-Request-Id", "upstream-own"),
            ("x-amzn-RequestId", "gw-1"),
        )
    )
    assert out == [(b"set-cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x-amzn-requestid", b"gw-1")]
    assert gateway_id == b"gw-1"
    # The usual Connection value names no other header: nothing more goes.
    out, _ = downstream_response_headers(raw(("Connection", "keep-alive"), ("Keep-Alive", "timeout=5"), ("X-A", "1")))
    assert out == [(b"x-a", b"1")]


def test_request_body_length():
    assert request_body_length(raw()) == 0
    assert request_body_length(raw(("content-length", "12"))) == 12
    assert request_body_length(raw(("transfer-encoding", "chunked"))) is None
    for bad in ("twelve", "5 ", "5\t", "+5", "-1", " 5"):
        with pytest.raises(ValueError, match=re.escape(repr(bad.encode()))):
            request_body_length(raw(("content-length", bad)))
