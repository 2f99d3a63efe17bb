"""Token endpoint failures as the client sees them, readiness, and the emulator's fidelity to Cognito."""

from __future__ import annotations

import base64
import logging

import httpx2
import pytest

from proxy.tokens.schedule import RefreshPolicy
from tests.conftest import FakeClock, RunningSidecar, Stack, assert_hidden, metric, run_sidecar, run_stack


async def test_revoked_refresh_token_is_a_503_that_explains_itself(
    stack: Stack, client: httpx2.AsyncClient, caplog: pytest.LogCaptureFixture
):
    stack.emulator.cognito.revoke_all()
    caplog.set_level(logging.DEBUG)
    async with run_sidecar(stack.settings()) as sidecar:
        response = await client.get(f"{sidecar.url}/x")
        ready = await client.get(f"{sidecar.url}/-/readyz")
        requests_after_failure = stack.token_requests
        for _ in range(5):
            assert (await client.get(f"{sidecar.url}/x")).status_code == 503
        metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
    assert response.status_code == 503
    assert response.headers["x-sidecar-error"] == "token_rejected"
    detail = response.json()["detail"]
    assert "invalid_grant" in detail
    assert "expired" in detail and "revoked" in detail and "another app client" in detail
    assert '{"error":"invalid_grant"}' in detail  # the raw body, for the person
    assert ready.status_code == 503
    assert "invalid_grant" in ready.json()["detail"]
    # A permanent refusal is not hammered: the next requests get the same answer at once.
    assert stack.token_requests == requests_after_failure
    assert "sidecar_token_permanent_failure 1.0" in metrics
    assert 'sidecar_errors_total{code="token_rejected"} 6.0' in metrics
    secret = stack.emulator.client.secret or ""
    everything = response.text + ready.text + caplog.text + metrics
    assert_hidden(everything, stack.emulator.refresh_token, secret)


async def test_wrong_client_secret_is_explained(stack: Stack, client: httpx2.AsyncClient):
    from proxy.settings import SecretStr

    async with run_sidecar(stack.settings(client_secret=SecretStr("not-the-secret"))) as sidecar:
        response = await client.get(f"{sidecar.url}/x")
    assert response.status_code == 503
    detail = response.json()["detail"]
    assert "invalid_client" in detail
    assert "encoded once" in detail
    assert_hidden(detail, "not-the-secret")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, "Internal Server Error"),
        (429, '{"message":"Rate exceeded"}'),
        (200, ""),
        (200, "<html>captive portal</html>"),
        (400, '{"__type":"TooManyRequestsException"}'),
    ],
)
async def test_transient_token_failures_are_retried(status: int, body: str, client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        # The sidecar fetches a token at start-up; fail the attempts it makes then and after.
        stack.emulator.cognito.fail_next(status, body, times=2)
        async with run_sidecar(stack.settings(), clock=clock, policy=RefreshPolicy()) as sidecar:
            early = await client.get(f"{sidecar.url}/x")  # the failure, at once: the retry is not due yet
            await clock.settle(10)  # enough for two backoff steps, throttling's 5 s included
            await clock.settle(10)
            response = await client.get(f"{sidecar.url}/x")
        assert early.status_code == 503
        assert early.headers["x-sidecar-error"] == "token_endpoint_unavailable"
        assert response.status_code == 200
        assert stack.token_requests == 3


async def test_token_endpoint_down_answers_503_with_the_reason(client: httpx2.AsyncClient):
    async with run_stack() as stack:
        stack.emulator.cognito.fail_next(503, "Service Unavailable", times=100_000)
        async with run_sidecar(stack.settings(token_timeout=0.5)) as sidecar:
            response = await client.get(f"{sidecar.url}/x")
        assert response.status_code == 503
        assert response.headers["x-sidecar-error"] == "token_endpoint_unavailable"
        assert "HTTP 503" in response.json()["detail"]
        assert stack.emulator.apigw.requests == 0  # nothing was sent without a token


async def test_cached_token_outlives_a_token_endpoint_outage(client: httpx2.AsyncClient):
    from tests.conftest import FakeClock

    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            stack.emulator.cognito.fail_next(500, "down", times=1000)
            clock.advance(3600 - 200)  # past the refresh margin, before the real expiry
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
            clock.advance(200)  # now really expired: never sent
            response = await client.get(f"{sidecar.url}/c")
            assert response.status_code == 503
            assert stack.emulator.apigw.authorized == 2


async def test_health_readiness_and_reserved_routes_are_not_forwarded(
    stack: Stack, sidecar: RunningSidecar, client: httpx2.AsyncClient
):
    assert (await client.get(f"{sidecar.url}/-/healthz")).json() == {"status": "ok"}
    ready = await client.get(f"{sidecar.url}/-/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready"
    metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
    assert metric(metrics, "sidecar_token_requests_total", outcome="success") == 1
    assert "sidecar_token_permanent_failure 0.0" in metrics
    assert "sidecar_token_expires_in_seconds 3" in metrics  # ~3600 s left
    missing = await client.get(f"{sidecar.url}/-/nothing")
    assert missing.status_code == 404
    assert missing.headers["x-sidecar-error"] == "not_found"
    assert stack.emulator.apigw.requests == 0


async def test_public_client_sends_no_authorization_header(client: httpx2.AsyncClient):
    async with run_stack(public_client=True) as stack, run_sidecar(stack.settings()) as sidecar:
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200


# The emulator answers as Cognito does ------------------------------------------------------------


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


async def test_emulator_token_endpoint_shapes(stack: Stack, client: httpx2.AsyncClient):
    cid = stack.emulator.client.client_id
    secret = stack.emulator.client.secret or ""
    url = stack.token_url
    form = {"grant_type": "refresh_token", "refresh_token": stack.emulator.refresh_token, "client_id": cid}

    ok = await client.post(url, data=form, headers={"Authorization": _basic(cid, secret)})
    assert ok.status_code == 200
    assert set(ok.json()) == {"id_token", "access_token", "token_type", "expires_in"}  # rotation off: no refresh_token
    post_auth = await client.post(url, data={**form, "client_secret": secret})
    assert post_auth.status_code == 200

    double = base64.b64encode(_basic(cid, secret).removeprefix("Basic ").encode()).decode()
    cases = [
        ({"Authorization": "Basic " + double}, form, "invalid_client"),
        ({"Authorization": _basic(cid, "wrong")}, form, "invalid_client"),
        ({"Authorization": _basic(cid, secret)}, {"grant_type": "refresh_token"}, "invalid_request"),
        ({"Authorization": _basic(cid, secret)}, {**form, "grant_type": "password"}, "unsupported_grant_type"),
        ({"Authorization": _basic(cid, secret)}, {**form, "grant_type": "client_credentials"}, "unauthorized_client"),
        ({"Authorization": _basic(cid, secret)}, {**form, "refresh_token": "nope"}, "invalid_grant"),
        (
            {"Authorization": _basic(cid, secret)},
            {**form, "grant_type": "authorization_code", "code": "x", "redirect_uri": "http://localhost:8001/callback"},
            "invalid_grant",
        ),
    ]
    for headers, data, error in cases:
        response = await client.post(url, data=data, headers=headers)
        assert (response.status_code, response.json()) == (400, {"error": error}), error
    assert (await client.get(url)).status_code == 405


async def test_emulator_api_gateway_refusals(stack: Stack, client: httpx2.AsyncClient):
    base = stack.upstream_url
    missing = await client.get(f"{base}/x")
    assert (missing.status_code, missing.json()) == (401, {"message": "Unauthorized"})
    assert missing.headers["x-amzn-errortype"] == "UnauthorizedException"
    assert "x-amzn-requestid" in missing.headers and "x-amz-apigw-id" in missing.headers
    bad = await client.get(f"{base}/x", headers={"Authorization": "garbage"})
    assert bad.status_code == 401
    wrong_stage = await client.get(f"{stack.api_url}/dev/x")
    assert (wrong_stage.status_code, wrong_stage.json()) == (403, {"message": "Missing Authentication Token"})
