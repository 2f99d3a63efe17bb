"""Token life under faults: clock skew, a hanging token endpoint, long outages, throttling, 401 floods.

Most of these run the sidecar with the real refresh policy (waits of seconds to minutes) on a clock the test
moves (``FakeClock.settle``): an hour of outage takes a moment, and every count is the count a real hour
would give. The emulated API Gateway verifies every token's signature and expiry on the same clock.
"""

from __future__ import annotations

import time

import httpx2
import pytest

from proxy.tokens.schedule import MAX_RETRY_WAIT, THROTTLED_MIN_WAIT, RefreshPolicy
from tests.conftest import FakeClock, metric, run_sidecar, run_stack

REAL = RefreshPolicy()
HOUR = 3600


@pytest.mark.parametrize(("behind", "lifetime"), [(40, 30), (20, 30)])
async def test_tokens_that_arrive_expired_or_inside_the_margin_are_never_sent(
    behind: int, lifetime: int, client: httpx2.AsyncClient
):
    # 40 s behind: each token arrives with exp 10 s in the past. 20 s behind: valid for 10 s, inside the 15 s
    # margin (half its 30 s life), so it would be refreshed at once, again and again.
    clock = FakeClock()
    async with run_stack(token_lifetime=lifetime) as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.skew = -behind
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            answers = [await client.get(f"{sidecar.url}/x") for _ in range(120)]
            ready = await client.get(f"{sidecar.url}/-/readyz")
            metrics = (await client.get(f"{sidecar.url}/-/metrics")).text
            at_start = stack.token_requests
            for _ in range(HOUR // 10):
                await clock.settle(10)
            in_an_hour = stack.token_requests - at_start
    assert {answer.status_code for answer in answers} == {503}
    assert answers[0].headers["x-sidecar-error"] == "token_clock_skew"
    assert f"differ by about {behind} s" in answers[0].json()["detail"]
    assert stack.emulator.apigw.requests == 0  # not one token went out
    assert at_start == 1  # 120 requests, one token request: they got the failure, not a new attempt each
    assert ready.status_code == 503
    assert ready.json()["error"] == "token_clock_skew"
    assert metric(metrics, "sidecar_token_refreshes_total", outcome="clock_skew") == 1
    assert in_an_hour <= 30, in_an_hour  # backoff across the hour: 0.1, 0.2, 0.4 ... 300 s


@pytest.mark.slow
async def test_a_hanging_token_endpoint_never_stalls_requests_that_hold_a_valid_token(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(token_timeout=0.5), clock=clock, policy=REAL) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            stack.emulator.cognito.latency = HOUR  # from now on the token endpoint hangs
            clock.advance(HOUR - 200)  # inside the margin: the refresher is asking, and hanging
            waits_before = sidecar.tokens.waits
            started = time.monotonic()
            statuses = [(await client.get(f"{sidecar.url}/b")).status_code for _ in range(50)]
            probes = [(await client.get(f"{sidecar.url}/-/readyz")).status_code for _ in range(20)]
            took = time.monotonic() - started
            waited = sidecar.tokens.waits - waits_before
            clock.advance(200)  # the token's real expiry: now requests have nothing to send
            expired = await client.get(f"{sidecar.url}/c")
    assert statuses == [200] * 50
    assert probes == [200] * 20
    assert waited == 0
    assert took < 5  # 70 requests; the hanging attempt alone is 0.5 s per try
    assert expired.status_code == 503
    assert stack.emulator.apigw.authorized == 51  # the expired token was never sent


async def test_a_one_hour_outage_costs_a_few_dozen_token_requests(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 200
            stack.emulator.cognito.fail_next(500, "Internal Server Error", times=100_000)
            before = stack.token_requests
            for _ in range(2 * HOUR // 10):  # the token expires an hour in; the outage goes on for another
                await clock.settle(10)
                assert (await client.get(f"{sidecar.url}/during")).status_code in (200, 503)
            outage_requests = stack.token_requests - before
            probes = sidecar.tokens.schedule.probes
            stack.emulator.cognito.faults.clear()  # Cognito is back
            for _ in range(int(MAX_RETRY_WAIT // 10) + 1):
                await clock.settle(10)
            after = await client.get(f"{sidecar.url}/after")
    # Two hours: about 25 in the first, 14 an hour at the cap; in the second, with no valid token while requests
    # came, early probes besides: the burst, then one a minute.
    assert outage_requests - probes <= 50, (outage_requests, probes)
    assert probes <= REAL.probe_burst + HOUR / REAL.probe_refill + 1, probes
    assert after.status_code == 200  # recovered within one maximal wait, without a person
    assert stack.emulator.apigw.authorized >= 2


async def test_requests_waiting_through_an_outage_see_cognitos_recovery_within_seconds(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.fail_next(500, "Internal Server Error", times=100_000)
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            for _ in range(60):  # a minute of HTTP 500, a request every second with no token to send
                assert (await client.get(f"{sidecar.url}/during")).status_code == 503
                await clock.settle(1)
            outage_requests = stack.token_requests
            stack.emulator.cognito.faults.clear()  # Cognito is back
            seconds = 0
            while (await client.get(f"{sidecar.url}/after")).status_code != 200:
                await clock.settle(1)
                seconds += 1
                assert seconds <= 30, "not recovered"
            probes = sidecar.tokens.schedule.probes
    assert seconds <= REAL.probe_gap, seconds  # the backoff alone waited up to 50 s here
    assert 1 <= probes <= REAL.probe_burst
    assert outage_requests <= 10 + probes + 1  # the backoff's ten in a minute, the probes, one more


async def test_retry_after_is_honoured(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.fail_next(429, '{"message":"Rate exceeded"}', headers={"Retry-After": "30"})
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            first = await client.get(f"{sidecar.url}/a")
            await clock.settle(29)
            still_one = stack.token_requests
            await clock.settle(2)
            second = await client.get(f"{sidecar.url}/b")
    assert first.status_code == 503
    assert first.headers["x-sidecar-error"] == "token_endpoint_unavailable"
    assert still_one == 1
    assert second.status_code == 200
    assert stack.token_requests == 2


async def test_cognito_throttling_in_an_html_body_counts_as_throttling(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        page = "<html><body>TooManyRequestsException: Rate exceeded</body></html>"
        stack.emulator.cognito.fail_next(400, page, content_type="text/html")
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            assert (await client.get(f"{sidecar.url}/a")).status_code == 503
            await clock.settle(THROTTLED_MIN_WAIT - 0.5)  # past a first backoff of at most 0.1 s
            held_off = stack.token_requests
            await clock.settle(1)
            assert (await client.get(f"{sidecar.url}/b")).status_code == 200
    assert held_off == 1


async def test_transient_failures_at_start_are_retried_with_growing_waits(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        stack.emulator.cognito.fail_next(502, "Bad Gateway", times=2)
        async with run_sidecar(stack.settings(), clock=clock, policy=REAL) as sidecar:
            early = await client.get(f"{sidecar.url}/a")
            await clock.settle(0.1)  # first wait: 0.075-0.1 s
            after_one = stack.token_requests
            await clock.settle(0.2)  # second wait: 0.15-0.2 s
            late = await client.get(f"{sidecar.url}/b")
    assert early.status_code == 503  # at once: no request waits for a retry that backoff put later
    assert after_one == 2
    assert late.status_code == 200
    assert stack.token_requests == 3


async def test_a_flood_of_401s_makes_at_most_two_token_requests(client: httpx2.AsyncClient):
    async with run_stack() as stack, run_sidecar(stack.settings()) as sidecar:
        assert (await client.get(f"{sidecar.url}/a")).status_code == 200
        stack.emulator.apigw.audiences.clear()  # API Gateway refuses every token from now on
        answers = [await client.get(f"{sidecar.url}/x") for _ in range(100)]
        answers += [await client.post(f"{sidecar.url}/x", content=b"p") for _ in range(100)]
    assert {answer.status_code for answer in answers} == {401}
    assert stack.token_requests <= 2, stack.token_requests


async def test_a_401_while_cognito_is_down_keeps_the_token_in_hand(client: httpx2.AsyncClient):
    async with run_stack() as stack, run_sidecar(stack.settings()) as sidecar:
        assert (await client.get(f"{sidecar.url}/a")).status_code == 200
        stack.emulator.cognito.fail_next(500, "down", times=100_000)
        audiences = set(stack.emulator.apigw.audiences)
        stack.emulator.apigw.audiences.clear()
        refused = await client.get(f"{sidecar.url}/b")
        stack.emulator.apigw.audiences.update(audiences)  # it was a passing glitch
        after = await client.get(f"{sidecar.url}/c")
    assert refused.status_code == 401
    assert after.status_code == 200  # the token in hand was kept: no 503 although Cognito is down
