"""When the refresher asks again: backoff, its cap, Retry-After and refusals. No server."""

from __future__ import annotations

import itertools
import random

import pytest

from proxy.errors import (
    PermanentTokenError,
    StoreError,
    StoreUnavailableError,
    TokenClockSkewError,
    TransientTokenError,
)
from proxy.tokens.endpoint import parse_retry_after
from proxy.tokens.schedule import MAX_RETRY_WAIT, RefreshPolicy, RefreshSchedule
from proxy.tokens.token import Token, TokenSet


def test_backoff_grows_to_its_cap_and_honours_retry_after_and_refusals():
    policy = RefreshPolicy()
    rng = random.Random(1)
    down = TransientTokenError(flow="refresh", status=500, error=None, body="", summary="down")
    waits = [policy.backoff(n, down, rng) for n in range(1, 20)]
    assert waits[0] <= 0.1
    bases = [min(0.1 * 2 ** (n - 1), MAX_RETRY_WAIT) for n in range(1, 20)]
    assert all(0.75 * base <= wait <= base for base, wait in zip(bases, waits, strict=True))
    assert max(waits) > MAX_RETRY_WAIT / 2
    later = TransientTokenError(flow="refresh", status=429, error=None, body="", summary="slow", retry_after=90)
    assert policy.backoff(1, later, rng) == 90
    refused = PermanentTokenError(flow="refresh", status=400, error="invalid_grant", body="", summary="no")
    assert policy.backoff(1, refused, rng) >= 60
    skewed = TokenClockSkewError(flow="refresh", kind="id_token", remaining=-10, lifetime=30, margin=15)
    assert skewed.skew == 40
    assert "about 40 s" in str(skewed)


def test_retry_after_takes_seconds_or_an_http_date():
    now = 1_700_000_000.0
    assert parse_retry_after("30", now=now) == 30
    assert parse_retry_after("Tue, 14 Nov 2023 22:15:00 GMT", now=now) == pytest.approx(100)
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after(None, now=now) is None


def fresh(received_at: float, life: float = 3600.0, margin: float = 300.0) -> TokenSet:
    token = Token(
        kind="id_token",
        value="t",
        received_at=received_at,
        refresh_at=received_at + life - margin,
        expires_at=received_at + life,
        claims={},
    )
    return TokenSet({"id_token": token})


DOWN = TransientTokenError.unanswered(flow="refresh", summary="down", fix="wait")
REFUSED = PermanentTokenError(flow="refresh", status=400, error="invalid_grant", body="", summary="no")
THROTTLED = TransientTokenError(flow="refresh", status=429, error=None, body="", summary="slow", throttled=True)


def test_no_token_means_at_once_and_a_token_means_late_in_its_life():
    schedule = RefreshSchedule(RefreshPolicy(), random.Random(7))
    assert schedule.next_attempt_at(100.0, None) == 100.0
    schedule.started(100.0)
    tokens = fresh(100.0)
    schedule.succeeded(tokens)
    usable = tokens.refresh_at - tokens.received_at
    assert 100.0 + 0.9 * usable <= schedule.background_at <= 100.0 + usable
    assert schedule.next_attempt_at(200.0, tokens) == schedule.background_at
    schedule.asked = True  # a 401, or a request past refresh_at
    assert schedule.next_attempt_at(200.0, tokens) == 200.0
    assert schedule.next_attempt_at(tokens.expires_at, tokens) == tokens.expires_at  # expired: at once


def test_a_shared_store_narrows_the_background_window():
    for seed in range(50):
        schedule = RefreshSchedule(RefreshPolicy(), random.Random(seed), shared=True)
        tokens = fresh(0.0)
        schedule.succeeded(tokens)
        assert 0.98 * tokens.refresh_at <= schedule.background_at <= tokens.refresh_at


def test_requests_are_never_closer_than_the_minimum_interval():
    schedule = RefreshSchedule(RefreshPolicy(min_interval=0.1), random.Random(1))
    schedule.started(50.0)
    schedule.asked = True
    assert schedule.next_attempt_at(50.01, None) == pytest.approx(50.1)


def test_failures_back_off_hold_waiters_and_are_forgotten_on_success_or_new_secrets():
    schedule = RefreshSchedule(RefreshPolicy(), random.Random(3))
    waits = []
    for attempt in range(1, 6):
        schedule.started(float(attempt))
        waits.append(schedule.failed(float(attempt), DOWN))
        assert schedule.failures_in_row == attempt
        assert schedule.held_off(float(attempt))
        # never sooner than the minimum interval after the request that failed
        assert schedule.next_attempt_at(float(attempt), None) == pytest.approx(attempt + max(waits[-1], 0.1))
    assert waits == sorted(waits)
    assert schedule.hold_for(DOWN, 1) >= 0.75 * 0.1 * 2**5  # the fleet's count never lowers this one's
    schedule.credentials_changed()
    assert (schedule.failures_in_row, schedule.held_off(6.0)) == (0, False)
    schedule.failed(6.0, DOWN)
    schedule.succeeded(fresh(7.0))
    assert (schedule.failures_in_row, schedule.held_off(7.0)) == (0, False)


def test_refused_tokens_ask_at_most_once_per_suspect_interval():
    schedule = RefreshSchedule(RefreshPolicy(suspect_interval=30.0), random.Random(1))
    assert schedule.suspect(10.0)
    assert not schedule.suspect(39.0)
    assert schedule.suspect(40.0)


def test_looks_at_an_unreachable_store_do_not_grow_the_backoff():
    schedule = RefreshSchedule(RefreshPolicy(), random.Random(5))
    outage = StoreUnavailableError(StoreError("redis://redis:6379/0", "connection refused"), "refresh")
    for second in range(30):  # the store down for half a minute, looked at every second
        assert schedule.failed(float(second), outage) == outage.retry_within
    assert schedule.failures_in_row == 0
    # Then Cognito fails once: the first failure's short wait, not the 30th's.
    assert schedule.failed(30.0, DOWN) <= RefreshPolicy().first_wait
    assert schedule.failures_in_row == 1
    assert schedule.hold_for(DOWN, 1) <= 2 * RefreshPolicy().first_wait  # what a fleet's hold-off note asks


def test_requests_waiting_without_a_token_probe_an_outage_early_within_a_budget():
    schedule = RefreshSchedule(RefreshPolicy(), random.Random(5))
    now = 0.0
    requests = []
    # Cognito answers 500 for 60 s while requests arrive every second with nothing valid to send.
    while now < 60.0:
        schedule.wanted(now)
        if schedule.next_attempt_at(now, None) <= now:
            schedule.started(now)
            requests.append(now)
            schedule.failed(now, DOWN)
        now += 1.0
    # Back: the next request that finds no token is within one probe gap of a token request.
    recovered = next(t for t in (60.0 + s for s in range(60)) if schedule.next_attempt_at(t, None) <= t)
    assert recovered - 60.0 <= 5.0
    assert schedule.probes >= 1
    # No request waiting: no probe, the backoff alone.
    quiet = RefreshSchedule(RefreshPolicy(), random.Random(5))
    for _ in range(10):
        at = quiet.next_attempt_at(quiet.not_before, None)
        quiet.started(at)
        quiet.failed(at, DOWN)
    assert quiet.next_attempt_at(at + 6.0, None) == quiet.not_before > at + 6.0 and quiet.probes == 0


def test_early_probes_have_a_budget_and_spare_refusals_and_throttling():
    policy = RefreshPolicy()
    schedule = RefreshSchedule(policy, random.Random(1))
    now, probes_at = 0.0, []
    while now < 3600.0:  # an hour's outage, requests waiting throughout
        schedule.wanted(now)
        if schedule.next_attempt_at(now, None) <= now:
            before = schedule.probes
            schedule.started(now)
            if schedule.probes > before:
                probes_at.append(now)
            schedule.failed(now, DOWN)
        now += 1.0
    assert len(probes_at) <= policy.probe_burst + 3600 / policy.probe_refill + 1
    assert all(b - a >= policy.probe_gap for a, b in itertools.pairwise(probes_at))
    for error in (REFUSED, THROTTLED):
        held = RefreshSchedule(policy, random.Random(1))
        held.failures_in_row = 9  # a backoff of about a minute
        held.started(0.0)
        held.failed(0.0, error)
        held.wanted(1.0)
        assert held.next_attempt_at(policy.probe_gap + 1, None) == held.not_before  # no probe
