"""Prometheus metrics, read from the sidecar's own counters at scrape time: nothing on the request path.

Names follow Envoy's credential injector where they overlap (token requested, fetched, failed). No
label or value ever holds a token, a secret or a URL with credentials.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.cache import TokenProvider
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.forward import Forwarder


class _Parts(Protocol):
    providers: list[TokenProvider]
    forwarders: list[Forwarder]
    draining: bool

    @property
    def errors(self) -> Counter[str]: ...


class SidecarCollector(Collector):
    """Sums over every route's provider and forwarder (one of each in the usual one-route form)."""

    def __init__(self, parts: _Parts, clock: Clock = SYSTEM_CLOCK) -> None:
        self._parts = parts
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        providers = self._parts.providers
        forwarders = self._parts.forwarders
        grants = [provider.grant for provider in providers]

        def total(values: Iterable[float]) -> float:
            return float(sum(values))

        yield CounterMetricFamily(
            "sidecar_token_requests",
            "Requests sent to the token endpoint, retries included",
            value=total(grant.endpoint.requests for grant in grants),
        )
        yield CounterMetricFamily(
            "sidecar_token_refreshes", "Refreshes that produced a token", value=total(p.refreshes for p in providers)
        )
        failed = CounterMetricFamily(
            "sidecar_token_refresh_failures",
            "Token requests that ended without a usable token, by kind: permanent (a person must act), transient, "
            "clock_skew (the token arrived nearly expired by this machine's clock), unusable",
            labels=["kind"],
        )
        for kind in ("permanent", "transient", "clock_skew", "unusable"):
            failed.add_metric([kind], total(p.failures[kind] for p in providers))
        yield failed
        yield CounterMetricFamily(
            "sidecar_token_waits",
            "Requests that waited for a token request because no valid token was held",
            value=total(p.waits for p in providers),
        )
        yield CounterMetricFamily(
            "sidecar_refresh_token_rotations",
            "Times Cognito rotated the refresh token",
            value=total(grant.rotations for grant in grants),
        )
        yield CounterMetricFamily(
            "sidecar_refresh_token_persist_failures",
            "Failed writes of a rotated refresh token to its file",
            value=total(grant.persist_failures for grant in grants),
        )
        now = self._clock.monotonic()
        remaining = [tokens.expires_at - now for p in providers if (tokens := p.usable()) is not None]
        yield GaugeMetricFamily(
            "sidecar_token_expires_in_seconds",
            "Seconds until the soonest cached token expires (0: a route has none cached)",
            value=min(remaining) if len(remaining) == len(providers) else 0.0,
        )
        refused = any(p.last_error is not None and getattr(p.last_error, "permanent", False) for p in providers)
        yield GaugeMetricFamily(
            "sidecar_token_permanent_failure",
            "1 while Cognito refuses a credential (a person must act)",
            value=1.0 if refused else 0.0,
        )
        yield CounterMetricFamily(
            "sidecar_upstream_replays",
            "Requests replayed once after API Gateway refused the token",
            value=total(f.replays for f in forwarders),
        )
        errors = CounterMetricFamily("sidecar_errors", "The sidecar's own error answers, by code", labels=["code"])
        codes: dict[str, int] = dict(self._parts.errors)
        for forwarder in forwarders:
            for code, count in forwarder.errors.items():
                codes[code] = codes.get(code, 0) + count
        for code, count in sorted(codes.items()):
            errors.add_metric([code], count)
        yield errors
        yield GaugeMetricFamily("sidecar_draining", "1 while shutting down", value=1.0 if self._parts.draining else 0.0)


def render(parts: _Parts, clock: Clock = SYSTEM_CLOCK) -> bytes:
    """The Prometheus text exposition of ``parts``'s counters."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(parts, clock))
    return generate_latest(registry)
