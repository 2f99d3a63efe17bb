"""When the refresher asks again: backoff, its cap, Retry-After and refusals. No server."""

from __future__ import annotations

import random

import pytest

from proxy.errors import PermanentTokenError, TokenClockSkewError, TransientTokenError
from proxy.tokens.endpoint import parse_retry_after
from proxy.tokens.provider import MAX_RETRY_WAIT, RefreshPolicy


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
