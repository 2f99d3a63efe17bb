"""Forwarding fidelity against real upstreams: header rules, cookies, redirects, streaming, failures."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import resource
import socket
from collections.abc import AsyncIterator

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.emulator import fingerprint
from proxy.server.serving import running
from tests.conftest import RunningSidecar, Stack, raw_request, run_sidecar

CHUNK = b"x" * (1024 * 1024)


class Upstream:
    """A plain upstream app for what API Gateway's stand-in does not do: cookies, redirects, big bodies."""

    def __init__(self) -> None:
        self.seen_headers: list[list[tuple[str, str]]] = []
        self.release = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/stage/cookies", self.cookies),
                Route("/stage/redirect", self.redirect),
                Route("/stage/hop", self.hop),
                Route("/stage/download/{mib:int}", self.download),
                Route("/stage/gzip", self.gzipped),
                Route("/stage/hang", self.hang),
                Route("/stage/broken", self.broken),
            ]
        )

    async def cookies(self, request: Request) -> Response:
        self.seen_headers.append([(k, v) for k, v in request.headers.items()])
        response = Response("ok")
        response.headers.append("set-cookie", "a=1; Path=/")
        response.headers.append("set-cookie", "b=2; Path=/")
        return response

    async def redirect(self, request: Request) -> Response:
        return Response(status_code=302, headers={"location": "https://elsewhere.example/next"})

    async def hop(self, request: Request) -> Response:
        return Response(
            "hop",
            headers={"connection": "x-private-hop", "x-private-hop": "1", "keep-alive": "timeout=5", "x-kept": "1"},
        )

    async def download(self, request: Request) -> Response:
        mib = request.path_params["mib"]

        async def body() -> AsyncIterator[bytes]:
            for _ in range(mib):
                yield CHUNK

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def gzipped(self, request: Request) -> Response:
        return Response(gzip.compress(b"hello " * 100), headers={"content-encoding": "gzip"})

    async def hang(self, request: Request) -> Response:
        await self.release.wait()
        return Response("late")

    async def broken(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"partial"
            raise RuntimeError("upstream died mid-body")

        return StreamingResponse(body(), headers={"content-length": "1000"})


@contextlib.asynccontextmanager
async def upstream_and_sidecar(stack: Stack, **overrides: object) -> AsyncIterator[tuple[Upstream, RunningSidecar]]:
    upstream = Upstream()
    async with running(upstream.app) as url:
        try:
            async with run_sidecar(stack.settings(upstream_url=f"{url}/stage", **overrides)) as sidecar:
                yield upstream, sidecar
        finally:
            upstream.release.set()


async def test_hop_by_hop_and_connection_listed_headers_are_stripped(stack: Stack, sidecar: RunningSidecar):
    request = (
        b"GET /h HTTP/1.1\r\nHost: localhost:8080\r\n"
        b"Connection: close, x-drop-me\r\nX-Drop-Me: secret-hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n"
        b"Proxy-Authorization: Basic abc\r\nUpgrade: h2c\r\nExpect: 100-continue\r\n"
        b"Authorization: the-client-s-own\r\nAuthorization: second\r\nX-Forwarded-For: 10.1.1.1\r\n"
        b"X-Custom: kept\r\n\r\n"
    )
    status, _, body = await raw_request(sidecar.url, request)
    assert status == 200
    echo = json.loads(body)
    names = [name for name, _ in echo["headers"]]
    for gone in ("connection", "x-drop-me", "keep-alive", "te", "proxy-authorization", "upgrade", "expect"):
        assert gone not in names, gone
    tokens = sidecar.tokens.usable()
    assert tokens is not None
    token = tokens["id_token"]
    assert [h for h in echo["headers"] if h[0] == "authorization"] == [
        ["authorization", f"[token {fingerprint(token.value)}]"]
    ]
    headers = dict(echo["headers"])
    assert headers["host"] == stack.api_url.removeprefix("http://")
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "localhost:8080"


async def test_nothing_is_added_on_the_client_s_behalf(stack: Stack, sidecar: RunningSidecar):
    # A POST with a body and only Host and Content-Length: no User-Agent, Accept, Accept-Encoding or Content-Type
    # appears on the way (the client library would add each), and Host is the upstream's.
    request = b"POST /bare HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    status, _, body = await raw_request(sidecar.url, request)
    assert status == 200
    headers = json.loads(body)["headers"]
    assert sorted(name for name, _ in headers) == [
        "authorization",
        "content-length",
        "host",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-request-id",
    ]
    assert dict(headers)["host"] == stack.api_url.removeprefix("http://")


async def test_cookies_pass_separately_and_never_reach_another_client(stack: Stack):
    async with upstream_and_sidecar(stack) as (upstream, sidecar):
        status, headers, _ = await raw_request(
            sidecar.url, b"GET /cookies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert status == 200
        assert headers["set-cookie"] == ["a=1; Path=/", "b=2; Path=/"]
        # A second client, with no cookies of its own: the upstream must see none.
        await raw_request(sidecar.url, b"GET /cookies HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert all(name != "cookie" for name, _ in upstream.seen_headers[1])


async def test_redirects_are_returned_not_followed(stack: Stack, client: httpx2.AsyncClient):
    async with upstream_and_sidecar(stack) as (_, sidecar):
        response = await client.get(f"{sidecar.url}/redirect")
        assert response.status_code == 302
        assert response.headers["location"] == "https://elsewhere.example/next"


async def test_response_hop_by_hop_headers_are_stripped(stack: Stack):
    async with upstream_and_sidecar(stack) as (_, sidecar):
        status, headers, body = await raw_request(
            sidecar.url, b"GET /hop HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        assert status == 200
        assert body == b"hop"
        assert "x-private-hop" not in headers
        assert "keep-alive" not in headers
        assert headers["x-kept"] == ["1"]


async def test_content_encoding_passes_through_untouched(stack: Stack, client: httpx2.AsyncClient):
    async with upstream_and_sidecar(stack) as (_, sidecar):
        async with client.stream("GET", f"{sidecar.url}/gzip") as response:
            raw = b"".join([chunk async for chunk in response.aiter_raw()])
        assert response.headers["content-encoding"] == "gzip"
        assert raw == gzip.compress(b"hello " * 100)


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
async def test_large_bodies_stream_both_ways_in_bounded_memory(stack: Stack, client: httpx2.AsyncClient):
    mib = 256
    # SIDECAR_MAX_BODY_BYTES=0: no body limit, as for an upstream that takes large uploads (not API Gateway).
    async with upstream_and_sidecar(stack, max_body_bytes=0) as (_, sidecar):
        before = _rss_mib()
        received = 0
        async with client.stream("GET", f"{sidecar.url}/download/{mib}") as response:
            assert response.status_code == 200
            async for chunk in response.aiter_raw():
                received += len(chunk)
        assert received == mib * len(CHUNK)
        download_growth = _rss_mib() - before

    async def upload() -> AsyncIterator[bytes]:
        for _ in range(mib):
            yield CHUNK

    async with run_sidecar(stack.settings(max_body_bytes=0)) as sidecar:
        before = _rss_mib()
        response = await client.post(f"{sidecar.url}/upload", content=upload())
        assert response.status_code == 200
        echo = response.json()
        assert echo["body_bytes"] == mib * len(CHUNK)
        assert echo["body_sha256"] == hashlib.sha256(CHUNK * mib).hexdigest()
        upload_growth = _rss_mib() - before
    # Sidecar, upstream and client share this process; a buffered body would add 256 MiB.
    assert download_growth < 64, download_growth
    assert upload_growth < 64, upload_growth


async def test_unreachable_upstream_is_a_502_in_the_sidecar_format(stack: Stack, client: httpx2.AsyncClient):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with run_sidecar(stack.settings(upstream_url=f"http://127.0.0.1:{port}/prod")) as sidecar:
        response = await client.get(f"{sidecar.url}/x")
    assert response.status_code == 502
    assert response.headers["x-sidecar-error"] == "upstream_unreachable"
    assert response.json()["error"] == "upstream_unreachable"


async def test_the_access_log_has_the_status_the_sidecar_sent_in_the_upstream_s_place(
    stack: Stack, client: httpx2.AsyncClient, capsys: pytest.CaptureFixture[str]
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = stack.settings(upstream_url=f"http://127.0.0.1:{port}/prod", access_log=True)
    async with run_sidecar(settings) as sidecar:
        response = await client.get(f"{sidecar.url}/x?y=1")
    assert response.status_code == 502
    assert '"GET /x" 502 source=sidecar error=upstream_unreachable' in capsys.readouterr().err  # by the stop


async def test_slow_upstream_is_a_504(stack: Stack, client: httpx2.AsyncClient):
    async with upstream_and_sidecar(stack, read_timeout=0.5) as (upstream, sidecar):
        response = await client.get(f"{sidecar.url}/hang")
        upstream.release.set()
    assert response.status_code == 504
    assert response.headers["x-sidecar-error"] == "upstream_timeout"


async def test_upstream_breaking_mid_body_breaks_the_client_connection(stack: Stack, client: httpx2.AsyncClient):
    async with upstream_and_sidecar(stack) as (_, sidecar):
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(f"{sidecar.url}/broken")
        # The sidecar itself carries on.
        assert (await client.get(f"{sidecar.url}/hop")).status_code == 200


async def test_api_gateway_answers_pass_through_untouched(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    stack.emulator.apigw.stage = "other"  # our requests now miss the stage
    response = await client.get(f"{sidecar.url}/x")
    assert response.status_code == 403
    assert response.json() == {"message": "Missing Authentication Token"}
    assert response.headers["x-amzn-errortype"] == "MissingAuthenticationTokenException"
    assert "x-sidecar-error" not in response.headers


async def test_authorizer_401_refreshes_once_and_replays(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    assert (await client.put(f"{sidecar.url}/a", content=b"payload")).status_code == 200
    stack.emulator.cognito.rotate_key()  # the cached token no longer verifies
    response = await client.put(f"{sidecar.url}/b", content=b"payload")
    assert response.status_code == 200
    assert response.json()["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert stack.token_requests == 2
    assert sidecar.forwarder.replays == 1


async def test_authorizer_401_for_a_post_refreshes_but_never_replays(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    assert (await client.get(f"{sidecar.url}/a")).status_code == 200
    stack.emulator.cognito.rotate_key()
    seen_before = stack.emulator.apigw.requests
    refused = await client.post(f"{sidecar.url}/b", content=b"payload")
    assert refused.status_code == 401  # as API Gateway answered: a POST is never sent twice
    assert stack.emulator.apigw.requests == seen_before + 1
    # The refusal asked for one refresh: the next request carries the new token (or waits for it and replays).
    assert (await client.get(f"{sidecar.url}/c")).status_code == 200
    assert stack.token_requests == 2
    assert stack.emulator.apigw.requests <= seen_before + 3


async def test_second_401_goes_back_to_the_client(stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient):
    assert (await client.get(f"{sidecar.url}/a")).status_code == 200
    stack.emulator.apigw.audiences.clear()  # API Gateway now refuses every token
    response = await client.get(f"{sidecar.url}/b")
    assert response.status_code == 401
    assert response.json() == {"message": "Unauthorized"}
    assert response.headers["x-amzn-errortype"] == "UnauthorizedException"
    assert stack.token_requests == 2


async def test_websockets_are_refused_not_forwarded(stack: Stack, sidecar: RunningSidecar):
    status, headers, _ = await raw_request(
        sidecar.url,
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    # API Gateway's Cognito authorizer cannot guard WebSockets; neither does the sidecar.
    assert (status, headers["x-sidecar-error"]) == (400, ["upgrade_not_supported"])
    assert stack.emulator.apigw.requests == 0


async def test_pipelined_requests_get_their_answers_whole_and_in_order(sidecar: RunningSidecar):
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        # Three requests in one segment: each answer's head and body must leave together and in order.
        writer.write(
            b"GET /first HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /second HTTP/1.1\r\nHost: localhost\r\n\r\n"
            b"GET /third HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=30)
    finally:
        writer.close()
    paths = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head[:40]
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        paths.append(json.loads(rest[:length])["path"])
        data = rest[length:]
    assert paths == ["/first", "/second", "/third"]
