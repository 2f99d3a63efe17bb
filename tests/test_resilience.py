"""Faults on every side, against real servers: what the client sees, how many token requests, no leaks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator

import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.server.serving import running
from tests.conftest import (
    BREAKS_OFF,
    SilentUpstream,
    Stack,
    answering,
    awaiting,
    metric,
    raw_upstream,
    run_sidecar,
    run_stack,
    sidecar_process,
    stack_env,
)


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
async def test_steady_state_requests_never_wait_for_a_token(client: httpx2.AsyncClient):
    # 8-second tokens: the margin is 4 s and the background refresh runs 3.6-4 s in, while the token in hand
    # stays valid until 7.2 s: requests never find themselves without one.
    async with run_stack(token_lifetime=8) as stack, run_sidecar(stack.settings()) as sidecar:
        stack.emulator.cognito.latency = 0.1  # a slow token endpoint: waiting for it would show
        assert (await client.get(f"{sidecar.url}/first")).status_code == 200
        waits_after_start = sidecar.tokens.waits
        statuses: list[int] = []
        deadline = time.monotonic() + 30
        while stack.token_requests < 3 and time.monotonic() < deadline and len(statuses) < 100_000:
            statuses.append((await client.get(f"{sidecar.url}/steady")).status_code)
        assert stack.token_requests >= 3, "the background refresh did not run"
        assert set(statuses) == {200}
        assert sidecar.tokens.waits == waits_after_start  # not one request waited for a refresh


async def test_token_endpoint_hanging_answers_503_within_the_bounds(client: httpx2.AsyncClient):
    async with run_stack() as stack:
        stack.emulator.cognito.latency = 1.0
        async with run_sidecar(stack.settings(token_timeout=0.2)) as sidecar:
            response = await client.get(f"{sidecar.url}/x")
    assert response.status_code == 503
    assert response.headers["x-sidecar-error"] == "token_endpoint_unavailable"
    assert "did not answer within 0.2 s" in response.json()["detail"]


async def test_a_token_endpoint_host_that_does_not_resolve_is_a_warning_at_start(
    stack: Stack, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
):
    settings = stack.settings(token_url="https://no-such-cognito-domain.invalid/oauth2/token")
    with awaiting("token_host_unresolved") as unresolved:
        async with run_sidecar(settings) as sidecar:
            await asyncio.wait_for(unresolved.wait(), 30)
            ready = await client.get(f"{sidecar.url}/-/healthz")
    assert ready.status_code == 200  # a warning, not a failure: DNS may come later
    [said] = [r.getMessage() for r in caplog.records if "does not resolve" in r.getMessage()]
    assert "no-such-cognito-domain.invalid" in said and "SIDECAR_COGNITO_DOMAIN" in said


async def test_token_endpoint_refusing_connections(stack: Stack, client: httpx2.AsyncClient):
    settings = stack.settings(token_url=f"http://127.0.0.1:{_closed_port()}/oauth2/token")
    async with run_sidecar(settings) as sidecar:
        response = await client.get(f"{sidecar.url}/x")
        ready = await client.get(f"{sidecar.url}/-/readyz")
    assert response.status_code == 503
    assert "Could not reach the token endpoint" in response.json()["detail"]
    assert ready.status_code == 503


async def test_readiness_on_process_stays_green_through_a_refused_credential_and_says_so(
    stack: Stack, client: httpx2.AsyncClient
):
    stack.emulator.cognito.fail_next(400, '{"error":"invalid_grant"}', times=1)
    async with run_sidecar(stack.settings(ready_when="process")) as sidecar:
        pending = await client.get(f"{sidecar.url}/-/readyz")  # the first token request may still be on its way
        forwarded = await client.get(f"{sidecar.url}/x")
        ready = await client.get(f"{sidecar.url}/-/readyz")
        metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
        sidecar.parts.draining = True
        draining = await client.get(f"{sidecar.url}/-/readyz")
    assert pending.status_code == 200 and pending.json()["token"]["error"] in ("token_pending", "token_rejected")
    assert forwarded.status_code == 503 and forwarded.headers["x-sidecar-error"] == "token_rejected"
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and "token_expires_in" not in ready.json()
    assert ready.json()["token"]["error"] == "token_rejected"
    assert "invalid_grant" in ready.json()["token"]["detail"]
    assert metric(metrics, "sidecar_token_permanent_failure") == 1  # what the alerts watch
    assert (draining.status_code, draining.json()["error"]) == (503, "draining")  # shutting down is not serving


async def test_draining_turns_readiness_red_while_requests_still_pass(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings()) as sidecar:
        sidecar.parts.draining = True
        ready = await client.get(f"{sidecar.url}/-/readyz")
        forwarded = await client.get(f"{sidecar.url}/x")
    assert ready.status_code == 503
    assert ready.json()["error"] == "draining"
    assert forwarded.status_code == 200


class FaultyUpstream:
    def __init__(self) -> None:
        self.app = Starlette(
            routes=[Route("/s/fail", self.fail), Route("/s/reset", self.reset), Route("/s/ok", self.ok)]
        )

    async def fail(self, request: Request) -> Response:
        return Response("boom", status_code=500)

    async def ok(self, request: Request) -> Response:
        return Response("ok")

    async def reset(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"half"
            raise ConnectionResetError("reset mid-body")

        return StreamingResponse(body(), headers={"content-length": "100"})


@pytest.mark.slow
async def test_no_descriptor_leaks_after_thousands_of_failing_requests(stack: Stack):
    upstream = FaultyUpstream()
    limits = httpx2.Limits(max_connections=20)
    async with (
        running(upstream.app) as upstream_url,
        run_sidecar(stack.settings(upstream_url=f"{upstream_url}/s")) as sidecar,
        run_sidecar(stack.settings(upstream_url=f"http://127.0.0.1:{_closed_port()}/s")) as refusing,
        httpx2.AsyncClient(trust_env=False, timeout=30, limits=limits) as client,
    ):

        async def burst(url: str, n: int) -> list[int]:
            async def one(i: int) -> int:
                try:
                    return (await client.get(url)).status_code
                except httpx2.RemoteProtocolError:
                    return -1  # the broken body, as intended

            return await asyncio.gather(*(one(i) for i in range(n)))

        # Warm every pool once, then count descriptors.
        await burst(f"{sidecar.url}/ok", 20)
        await burst(f"{refusing.url}/x", 20)
        gc.collect()
        before = _open_fds()
        assert set(await burst(f"{sidecar.url}/fail", 1000)) == {500}
        assert set(await burst(f"{sidecar.url}/reset", 500)) == {-1}
        assert set(await burst(f"{refusing.url}/x", 1000)) == {502}
        assert set(await burst(f"{sidecar.url}/ok", 20)) == {200}
        gc.collect()
        after = _open_fds()
    # Pools may hold a few more idle keep-alive connections than after the warm-up, never hundreds.
    assert after - before < 40, (before, after)
    assert stack.token_requests == 2  # one per sidecar, however many requests failed


@pytest.mark.slow
async def test_sigterm_lets_in_flight_requests_finish(stack: Stack):
    release = asyncio.Event()
    entered = asyncio.Event()

    async def slow(request: Request) -> Response:
        entered.set()
        await release.wait()
        return Response("finished")

    upstream = Starlette(routes=[Route("/s/slow", slow)])
    async with running(upstream) as upstream_url:
        env = stack_env(
            stack, SIDECAR_UPSTREAM_URL=f"{upstream_url}/s", SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token
        )
        async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            in_flight = asyncio.create_task(client.get(f"{sidecar.url}/slow"))
            async with asyncio.timeout(30):
                await entered.wait()
            sidecar.process.send_signal(signal.SIGTERM)
            release.set()
            response = await in_flight
            code, logged = await sidecar.stop()
    assert response.status_code == 200
    assert response.text == "finished"
    assert code == 0
    assert "Traceback" not in logged


async def test_an_upstream_breaking_off_mid_body_is_logged_and_counted_without_a_traceback(
    stack: Stack, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
):
    caplog.set_level(logging.INFO)
    async with (
        raw_upstream(answering(BREAKS_OFF)) as url,
        run_sidecar(stack.settings(upstream_url=url, access_log=True)) as sc,
    ):
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(f"{sc.url}/x")
        metrics = (await client.get(f"{sc.url}/-/metrics")).text
    assert 'sidecar_errors_total{code="upstream_broke_off"} 1.0' in metrics
    assert "broke off the response body" in caplog.text
    assert "Traceback" not in caplog.text
    assert "without completing" not in caplog.text
    assert '"GET /x" 200 source=upstream error=upstream_broke_off' in capsys.readouterr().err  # the access log


async def test_waiting_for_a_free_upstream_connection_is_bounded_by_the_pool_timeout(
    stack: Stack, client: httpx2.AsyncClient
):
    upstream = SilentUpstream()
    settings = {"max_connections": 1, "pool_timeout": 0.3, "connect_timeout": 5.0}
    async with raw_upstream(upstream) as url, run_sidecar(stack.settings(upstream_url=url, **settings)) as sc:
        holder = asyncio.create_task(client.get(f"{sc.url}/holds-the-only-connection"))
        await upstream.first_connection()
        started = time.monotonic()
        waiting = await client.get(f"{sc.url}/waits")
        took = time.monotonic() - started
        upstream.release.set()
        with contextlib.suppress(httpx2.HTTPError):
            await holder
    assert waiting.status_code == 504
    assert waiting.headers["x-sidecar-error"] == "upstream_timeout"
    assert took < 3  # the pool timeout (0.3 s), not the pool plus the connect timeout (5.3 s)


@pytest.mark.slow
async def test_requests_cut_off_by_the_shutdown_grace_get_the_sidecars_own_answer(stack: Stack):
    upstream = SilentUpstream()
    async with raw_upstream(upstream) as url:
        env = stack_env(
            stack,
            SIDECAR_UPSTREAM_URL=url,
            SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token,
            SIDECAR_SHUTDOWN_GRACE="1",
        )
        async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
            in_flight = asyncio.create_task(client.get(f"{sidecar.url}/slow"))
            await upstream.first_connection()
            sidecar.process.send_signal(signal.SIGTERM)
            response = await in_flight
            await asyncio.wait_for(sidecar.process.wait(), timeout=30)  # exits by itself; no second signal
            code, logged = await sidecar.stop()
            upstream.release.set()
    assert response.status_code == 503
    assert response.headers["x-sidecar-error"] == "shutting_down"
    assert code == 0
    assert "Traceback" not in logged
