"""Prometheus metrics, read from the sidecar's own counters at scrape time: nothing on the request path.

Names follow Envoy's credential injector where they overlap (token requested, fetched, failed). No
label or value ever holds a token, a secret or a URL with credentials.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cache import TokenProvider
from proxy.credentials import ClientCredentialsGrant, RefreshTokenGrant
from proxy.forward import Forwarder
from proxy.tokens import TokenEndpoint


class _Parts(Protocol):
    endpoint: TokenEndpoint
    grant: RefreshTokenGrant | ClientCredentialsGrant
    tokens: TokenProvider
    forwarder: Forwarder
    draining: bool


class SidecarCollector(Collector):
    def __init__(self, parts: _Parts, clock: Callable[[], float] = time.time) -> None:
        self._parts = parts
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        parts = self._parts
        tokens = parts.tokens
        yield CounterMetricFamily(
            "sidecar_token_requests",
            "Requests sent to the token endpoint, retries included",
            value=parts.endpoint.requests,
        )
        yield CounterMetricFamily("sidecar_token_refreshes", "Refreshes that produced a token", value=tokens.refreshes)
        failed = CounterMetricFamily(
            "sidecar_token_refresh_failures", "Refreshes that ended without a token, by kind", labels=["kind"]
        )
        failed.add_metric(["all"], tokens.failures)
        yield failed
        yield CounterMetricFamily(
            "sidecar_token_waits", "Requests that had to wait for a token refresh", value=tokens.waits
        )
        yield CounterMetricFamily(
            "sidecar_refresh_token_rotations",
            "Times Cognito rotated the refresh token",
            value=parts.grant.rotations,
        )
        yield CounterMetricFamily(
            "sidecar_refresh_token_persist_failures",
            "Failed writes of a rotated refresh token to its file",
            value=parts.grant.persist_failures,
        )
        token = tokens.cached()
        yield GaugeMetricFamily(
            "sidecar_token_expires_in_seconds",
            "Seconds until the cached token expires (0: none cached)",
            value=max(token.expires_at - self._clock(), 0.0) if token else 0.0,
        )
        error = tokens.last_error
        yield GaugeMetricFamily(
            "sidecar_token_permanent_failure",
            "1 while Cognito refuses the credential (a person must act)",
            value=1.0 if error is not None and getattr(error, "permanent", False) else 0.0,
        )
        yield CounterMetricFamily(
            "sidecar_upstream_replays",
            "Requests replayed once after API Gateway refused the token",
            value=parts.forwarder.replays,
        )
        errors = CounterMetricFamily("sidecar_errors", "The sidecar's own error answers, by code", labels=["code"])
        for code, count in sorted(parts.forwarder.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield GaugeMetricFamily("sidecar_draining", "1 while shutting down", value=1.0 if parts.draining else 0.0)


def render(parts: _Parts, clock: Callable[[], float] = time.time) -> bytes:
    """The Prometheus text exposition of ``parts``'s counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(parts, clock))
    return generate_latest(registry)
