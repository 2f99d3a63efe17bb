"""The whole path: client -> sidecar -> emulated API Gateway, with a token from the emulated Cognito."""

from __future__ import annotations

import asyncio
import hashlib

import httpx2
import pytest

from proxy.emulator import fingerprint
from tests.conftest import FakeClock, RunningSidecar, Stack, raw_request, run_sidecar, run_stack


async def test_request_arrives_with_a_valid_id_token(stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient):
    response = await client.get(f"{sidecar.url}/hello?name=world")
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "GET"
    assert echo["path"] == "/hello"
    assert echo["query_string"] == "name=world"
    assert echo["claims"]["token_use"] == "id"
    assert echo["claims"]["aud"] == stack.emulator.client.client_id
    tokens = sidecar.tokens.usable()
    assert tokens is not None
    token = tokens["id_token"]
    assert echo["token_sha256"] == fingerprint(token.value)


async def test_every_method_and_body_arrives_intact(sidecar: RunningSidecar, client: httpx2.AsyncClient):
    body = bytes(range(256)) * 300
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        response = await client.request(method, f"{sidecar.url}/items/1", content=body)
        assert response.status_code == 200, method
        echo = response.json()
        assert echo["method"] == method
        assert echo["body_bytes"] == len(body)
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    head = await client.head(f"{sidecar.url}/items/1")
    assert head.status_code == 200
    assert head.content == b""


async def test_raw_path_and_query_pass_byte_for_byte(sidecar: RunningSidecar):
    target = b"/a%2Fb/%7Euser/x+y/caf%C3%A9/;p=1?b=1&b=2&empty=&plus=a+b&pct=%20%2B&flag"
    status, _, body = await raw_request(
        sidecar.url, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    echo = __import__("json").loads(body)
    path, _, query = target.decode().partition("?")
    assert echo["raw_path"] == "/prod" + path
    assert echo["query_string"] == query


async def test_the_request_cannot_change_the_upstream_host(stack: Stack, sidecar: RunningSidecar):
    upstream_host = stack.api_url.removeprefix("http://")
    hostile = [
        b"http://evil.example/x",
        b"//evil.example/x",
        b"/@evil.example/x",
        b"/\\evil.example/x",
        b"/%2F%2Fevil.example/x",
    ]
    # Read by some servers as a dot segment: refused before anything is sent (docs/security.md).
    before = stack.emulator.apigw.requests
    status, _, body = await raw_request(
        sidecar.url, b"GET /..%2F..%2Fevil HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert (status, stack.emulator.apigw.requests) == (400, before), body
    for target in hostile:
        before = stack.emulator.apigw.requests
        status, _, body = await raw_request(
            sidecar.url, b"GET " + target + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        # Every one of them reached our upstream, under our stage, and nowhere else.
        assert stack.emulator.apigw.requests == before + 1, target
        assert status == 200, (target, body)
        echo = __import__("json").loads(body)
        assert echo["raw_path"].startswith("/prod/"), target
        assert ["host", upstream_host] in echo["headers"]


async def test_token_is_cached_across_requests(stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient):
    for _ in range(20):
        assert (await client.get(f"{sidecar.url}/ping")).status_code == 200
    assert stack.token_requests == 1


async def test_token_in_the_margin_is_still_sent_while_it_refreshes_and_never_after_expiry(
    client: httpx2.AsyncClient,
):
    clock = FakeClock()
    async with run_stack(token_lifetime=3600) as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            first = (await client.get(f"{sidecar.url}/a")).json()["token_sha256"]
            # Inside the safety margin (5 minutes before exp): the token in hand is still sent, no request waits,
            # and the refresher renews it meanwhile.
            clock.advance(3600 - 299)
            assert (await client.get(f"{sidecar.url}/b")).json()["token_sha256"] == first
            clock.advance(299)  # the first token's real expiry has passed: never sent again
            second = (await client.get(f"{sidecar.url}/c")).json()["token_sha256"]
            assert second != first
            assert stack.token_requests == 2
            clock.advance(10)
            assert (await client.get(f"{sidecar.url}/d")).json()["token_sha256"] == second
            assert stack.token_requests == 2
    assert stack.emulator.apigw.authorized == 4


async def test_short_lived_tokens_use_half_their_life_as_margin(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack(token_lifetime=60) as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            await client.get(f"{sidecar.url}/a")
            tokens = sidecar.tokens.current
            assert tokens is not None
            # margin min(300 s, 30 s); kept 6 s (a tenth, at most 5 s) from the real expiry.
            assert tokens.refresh_at - tokens.received_at == pytest.approx(30, abs=1)
            assert tokens.expires_at - tokens.received_at == pytest.approx(55, abs=1)
            clock.advance(26)  # before 90% of the usable 30 s: nothing asks the token endpoint
            await client.get(f"{sidecar.url}/b")
            assert stack.token_requests == 1
            clock.advance(30)  # past the first token's life: the request carries a new one
            assert (await client.get(f"{sidecar.url}/c")).status_code == 200
            assert stack.token_requests == 2


@pytest.mark.slow
async def test_500_concurrent_requests_cause_one_token_request(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        # A slow token endpoint: every request below arrives while the refresh is in flight.
        stack.emulator.cognito.latency = 0.3
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            limits = httpx2.Limits(max_connections=500)
            async with httpx2.AsyncClient(trust_env=False, timeout=60, limits=limits) as many:
                cold = await asyncio.gather(*(many.get(f"{sidecar.url}/cold/{i}") for i in range(500)))
                assert [r.status_code for r in cold] == [200] * 500
                assert stack.token_requests == 1
                clock.advance(3600)  # the cached token has expired
                expired = await asyncio.gather(*(many.get(f"{sidecar.url}/warm/{i}") for i in range(500)))
                assert [r.status_code for r in expired] == [200] * 500
                assert stack.token_requests == 2
                assert len({r.json()["token_sha256"] for r in expired}) == 1


async def test_rotated_refresh_token_replaces_the_old_one(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack(rotate_refresh_tokens=True, grace_period=0) as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            assert sidecar.grant.rotations == 1
            assert fingerprint(sidecar.grant.refresh_token) != fingerprint(stack.emulator.refresh_token)
            clock.advance(3600)
            # The old refresh token is dead (grace 0): this only works with the rotated one.
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            assert sidecar.grant.rotations == 2
            assert stack.token_requests == 2


async def test_access_token_with_bearer_prefix_in_another_header(client: httpx2.AsyncClient):
    async with run_stack() as stack:
        stack.emulator.apigw._header = b"x-auth"
        settings = stack.settings(token="access_token", header="X-Auth", header_prefix="Bearer ")
        async with run_sidecar(settings) as sidecar:
            response = await client.get(f"{sidecar.url}/a", headers={"X-Auth": "client's own value"})
            assert response.status_code == 200
            echo = response.json()
            assert echo["claims"]["token_use"] == "access"
            assert [h for h in echo["headers"] if h[0] == "x-auth"] == [["x-auth", f"[token {echo['token_sha256']}]"]]
