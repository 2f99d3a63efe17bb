"""What ``proxy.egress.client.ForwardedRequest`` relies on in aiohttp's ``ClientRequest``, so that an upgrade that
changes it fails here rather than in the headers a client's request arrives with.

ForwardedRequest overrides ``update_headers`` and ``update_auto_headers`` to do once what aiohttp does per request.
Built from the same inputs, it must hold exactly the headers, and the table of headers not to add, that aiohttp's
own request holds. And ``serve`` imports aiohttp so that its import-time TLS contexts skip the CA bundle (last test).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict
from yarl import URL

from proxy.egress.client import (
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    RETRIED_METHODS,
    SKIPPED_AUTO_HEADERS,
    ForwardedRequest,
    UpstreamClient,
)
from proxy.emulator.pki import TestCA

CASES = {
    "plain": ("GET", "http://api.example:8443/prod/x", [("Authorization", "t"), ("X-Request-Id", "r")], None),
    "repeated names": ("GET", "http://api.example/x", [("X-A", "1"), ("x-a", "2"), ("Cookie", "a=1")], None),
    "a body": ("POST", "https://api.example/x", [("Content-Length", "5")], b"hello"),
    "no headers": ("GET", "http://[::1]:9/x", [], None),
    "a Host given": ("GET", "http://api.example/x", [("Host", "other.example"), ("X-B", "2")], None),
}


def test_client_request_still_calls_the_two_steps_from_its_constructor():
    source = inspect.getsource(aiohttp.ClientRequest.__init__)
    assert "self.update_headers(headers)" in source
    assert "self.update_auto_headers(skip_auto_headers)" in source
    # The table update_auto_headers leaves behind, which later steps (a body's Content-Type) consult.
    assert "self._skip_auto_headers" in inspect.getsource(aiohttp.ClientRequest)


@pytest.mark.parametrize("form", [CIMultiDict, list], ids=["a CIMultiDict", "a list (UpstreamClient.send's)"])
@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_forwarded_request_holds_what_aiohttp_s_own_request_holds(
    case: tuple[str, str, list[tuple[str, str]], bytes | None], form: type
):
    method, url, headers, body = case
    built = [
        kind(method, URL(url), headers=form(headers), skip_auto_headers=SKIPPED_AUTO_HEADERS, data=body)
        for kind in (aiohttp.ClientRequest, ForwardedRequest)
    ]
    theirs, ours = built
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert sorted(ours.skip_auto_headers) == sorted(theirs.skip_auto_headers)


# serve imports aiohttp inside proxy.egress.tls.bundle_deferred, so that the two default contexts aiohttp's connector
# module builds as it is imported skip OpenSSL's default CA file (a tenth of the sidecar's start). The probe names that
# file (a one-certificate bundle, so the figures hold on any machine) and reads what each context loaded.
BUNDLE_PROBE = """
import json, ssl
from proxy.egress.tls import bundle_deferred, default_context
with bundle_deferred():
    import aiohttp.connector
print(json.dumps([
    aiohttp.connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    default_context().cert_store_stats()["x509_ca"],
]))
"""


def test_aiohttp_s_import_time_contexts_skip_the_bundle_and_the_sidecar_s_own_loads_it(tmp_path: Path):
    bundle = TestCA(tmp_path, "Machine Trust Store CA").ca_file
    env = {**os.environ, "SSL_CERT_FILE": str(bundle)}
    probe = subprocess.run([sys.executable, "-c", BUNDLE_PROBE], env=env, capture_output=True, check=True, timeout=60)
    aiohttp_s, sidecar_s = json.loads(probe.stdout)
    assert (aiohttp_s, sidecar_s) == (0, 1)


# UpstreamClient.send takes the steps ClientSession._request takes for the forwarder's requests. The source checks say
# that aiohttp still takes them so; the wire tests below say that both ways send the same bytes and retry alike.


def test_client_session_request_still_takes_the_steps_upstream_client_send_takes():
    source = inspect.getsource(aiohttp.ClientSession._request)
    for step in (
        "await self._connector.connect(",
        "conn.protocol.set_response_params(",
        "skip_payload=req.method in EMPTY_BODY_METHODS",
        "resp = await req.send(conn)",
        "await resp.start(conn)",
        "retry_persistent_connection = (",
        "raise ClientOSError(*exc.args) from exc",
        "raise ConnectionTimeoutError(",
    ):
        assert step in source, step
    # A closed pooled connection: an idempotent request goes once more, with the payload made of its body.
    retry = (
        r"except \(ClientOSError, ServerDisconnectedError\):\s+if not retry_persistent_connection:\s+raise\s+"
        r"retry_persistent_connection = False\s+if data is not None:.*?await req\.close\(\)\s+"
        r"if req\._body is not None and req\._body\.consumed:\s+raise\s+data = req\._body\s+continue"
    )
    assert re.search(retry, source, re.DOTALL)
    assert aiohttp.client.IDEMPOTENT_METHODS == RETRIED_METHODS
    assert {"HEAD"} == aiohttp.helpers.EMPTY_BODY_METHODS
    defaults = inspect.signature(aiohttp.ClientSession).parameters
    assert (defaults["max_line_size"].default, defaults["max_field_size"].default) == (MAX_LINE_SIZE, MAX_FIELD_SIZE)
    assert defaults["max_headers"].default == MAX_HEADERS
    accepted = inspect.signature(ResponseHandler.set_response_params).parameters
    assert {"timer", "skip_payload", "read_timeout", "read_bufsize", "max_headers", "timeout_ceil_threshold"} <= set(
        accepted
    )


class _Recorder:
    """A loopback HTTP/1.1 server that records each request's bytes as they arrived and answers 200 with a small
    body; ``drop`` requests (counted from 1 across connections) get the connection closed without an answer."""

    def __init__(self, drop: frozenset[int] = frozenset()) -> None:
        self.requests: list[bytes] = []
        self.connections = 0
        self.drop = drop

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                body = b""
                lower = head.lower()
                if b"transfer-encoding: chunked" in lower:
                    while True:
                        size_line = await reader.readuntil(b"\r\n")
                        chunk = await reader.readexactly(int(size_line, 16) + 2)
                        body += size_line + chunk
                        if size_line == b"0\r\n":
                            break
                elif b"content-length:" in lower:
                    length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
                    body = await reader.readexactly(length)
                self.requests.append(head + body)
                if len(self.requests) in self.drop:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + (b"" if head.startswith(b"HEAD") else b"ok")
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _chunks() -> AsyncIterator[bytes]:
    yield b"first "
    yield b"second"


WIRE_CASES = {
    # Repeated names as the server hands them over, lower-cased.
    "GET": ("GET", [("Authorization", "t" * 900), ("X-Request-Id", "r"), ("x-a", "1"), ("x-a", "2")], None),
    "HEAD": ("HEAD", [("Accept", "*/*")], None),
    "POST": ("POST", [("Content-Length", "5"), ("Content-Type", "text/plain")], b"hello"),
    "a streamed PUT": ("PUT", [("X-Stream", "1")], "stream"),
    "no headers": ("DELETE", [], None),
}


@pytest.mark.parametrize("proxied", [False, True], ids=["direct", "through an egress proxy"])
@pytest.mark.parametrize("case", WIRE_CASES.values(), ids=list(WIRE_CASES))
async def test_upstream_client_sends_the_bytes_client_session_request_sends(
    case: tuple[str, list[tuple[str, str]], bytes | str | None], proxied: bool
):
    method, headers, body = case
    recorder = _Recorder()
    server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Through a proxy, an http:// URL goes to the proxy (the recorder) in absolute form, with the proxy's headers.
    url = URL("http://api.example:8443/prod/items?id=1" if proxied else f"http://127.0.0.1:{port}/prod/items?id=1")
    proxy = URL(f"http://127.0.0.1:{port}") if proxied else None
    proxy_headers = {"Proxy-Authorization": "Basic dTpw"} if proxied else None
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=5)
    client = UpstreamClient(timeout=timeout, max_connections=4, proxy=proxy, proxy_headers=proxy_headers)
    try:
        answers = []
        for way in ("aiohttp", "ours"):
            data = _chunks() if body == "stream" else body
            if way == "aiohttp":
                response = await client.session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    compress=None,
                    proxy=proxy,
                    proxy_headers=proxy_headers,
                )
            else:
                response = await client.send(method, url, headers, data, True)
            async with response:
                answers.append((response.status, await response.read()))
        head_answer = (200, b"") if method == "HEAD" else (200, b"ok")
        assert answers == [head_answer, head_answer]
        theirs, ours = recorder.requests
        assert ours == theirs
        assert recorder.connections == 1  # the second went on the first's kept-alive connection
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("method", "body", "retried"),
    [("GET", None, True), ("PUT", b"again", True), ("POST", b"once", False), ("PUT", "stream", False)],
    ids=["GET", "PUT with a body", "POST", "a streamed PUT"],
)
async def test_a_pooled_connection_closed_by_the_upstream_is_retried_as_aiohttp_retries_it(
    method: str, body: bytes | str | None, retried: bool
):
    # Each way sends a first request (answered, the connection kept) and a second that the upstream reads and closes
    # the connection on without answering: aiohttp sends an idempotent request with a body it can send again once
    # more, on a new connection; any other fails. Both ways must agree.
    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5, sock_read=5)
    outcomes = []
    for way in ("aiohttp", "ours"):
        recorder = _Recorder(drop=frozenset({2}))
        server = await asyncio.start_server(recorder.handle, "127.0.0.1", 0)
        url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x")
        client = UpstreamClient(timeout=timeout, max_connections=4)
        try:
            async with await client.send("GET", url, [], None, True) as first:
                await first.read()
            data = _chunks() if body == "stream" else body
            try:
                if way == "aiohttp":
                    second = await client.session.request(method, url, data=data, allow_redirects=False)
                else:
                    second = await client.send(method, url, [], data, True)
            except aiohttp.ServerDisconnectedError:
                outcome = "disconnected"
            else:
                async with second:
                    outcome = f"{second.status} {(await second.read()).decode()}"
            outcomes.append((outcome, recorder.connections, [request.split(b" ")[0] for request in recorder.requests]))
            if retried and way == "ours":
                assert recorder.requests[1] == recorder.requests[2]  # the same request, body and all, sent again
        finally:
            await client.aclose()
            server.close()
            await server.wait_closed()
    theirs, ours = outcomes
    assert ours == theirs
    if retried:
        assert ours == ("200 ok", 2, [b"GET", method.encode(), method.encode()])
    else:
        assert ours == ("disconnected", 1, [b"GET", method.encode()])
