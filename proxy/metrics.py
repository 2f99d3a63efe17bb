"""Prometheus metrics: the sidecar's own counts, turned into metric families at scrape time, after the default
registry's (``process_*``, ``python_gc_*``, ``python_info``).

On the request path there are only plain counts (``RequestMetrics.observe``, ``proxy.stats``); everything
else is read from the token providers and forwarders when scraped. Names follow Prometheus conventions
(``_total`` counters, ``_seconds`` in base units) and Envoy's credential injector where they overlap. Every
label has a bounded set of values: routes are the configured prefixes (``/-/`` for the sidecar's own routes,
``none`` before one was chosen), methods the common seven and ``other``, status classes ``1xx``-``5xx`` and
``none``, outcomes and error codes the sidecar's own. No label or value ever holds a path, an id, a token or a
secret.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.samples import Exemplar

from proxy import __version__
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.forward import Forwarder
from proxy.stats import Histogram, RequestMetrics
from proxy.tokens.fleet import SharedRefresh
from proxy.tokens.provider import TokenProvider

# What a token request or a refresh ended in: success, or ``TokenError.failure_kind``. A token request's answer
# is found too old or unusable only afterwards, so those two are refresh outcomes alone.
REQUEST_OUTCOMES = ("success", "permanent", "transient", "throttled")
REFRESH_OUTCOMES = (*REQUEST_OUTCOMES, "clock_skew", "unusable", "store_unavailable")


class _Route(Protocol):
    @property
    def label(self) -> str: ...

    @property
    def forwarder(self) -> Forwarder: ...


class _Parts(Protocol):
    providers: list[TokenProvider]
    forwarders: list[Forwarder]

    @property
    def routes(self) -> list[Any]: ...

    draining: bool
    requests: RequestMetrics

    @property
    def errors(self) -> Counter[str]: ...


def _histogram(name: str, documentation: str, by_route: Iterable[tuple[str, Histogram]]) -> HistogramMetricFamily:
    """One series per route that has observations."""
    family = HistogramMetricFamily(name, documentation, labels=["route"])
    for route, histogram in sorted(by_route, key=lambda pair: pair[0]):
        if histogram.count:
            buckets: list[Any] = histogram.cumulative()
            for index, (trace_id, value, when) in histogram.exemplars.items():
                buckets[index] = (*buckets[index], Exemplar({"trace_id": trace_id}, value, when))
            family.add_metric([route], buckets, histogram.sum)
    return family


def _outcomes(
    name: str, documentation: str, outcomes: tuple[str, ...], counts: Iterable[Counter[str]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=["outcome"])
    total: Counter[str] = Counter()
    for count in counts:
        total.update(count)
    for outcome in outcomes:
        family.add_metric([outcome], total[outcome])
    return family


class SidecarCollector(Collector):
    """Sums over every route's provider and forwarder (one of each in the usual one-route form)."""

    def __init__(self, parts: _Parts, clock: Clock = SYSTEM_CLOCK) -> None:
        self._parts = parts
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._tokens()
        yield from self._sidecar()

    def _requests(self) -> Iterator[Metric]:
        metrics = self._parts.requests
        requests = CounterMetricFamily(
            "sidecar_requests",
            "Requests answered, by route prefix, method and status class (none: the client left before an answer)",
            labels=["route", "method", "status_class"],
        )
        for (route, method, status), count in sorted(metrics.requests.items()):
            requests.add_metric([route, method, f"{status}xx" if status else "none"], count)
        yield requests
        yield _histogram(
            "sidecar_request_duration_seconds",
            "Time from the request's head arriving to the end of the answer, by route prefix",
            ((route, stats.durations) for route, stats in metrics.routes.items()),
        )
        yield _histogram(
            "sidecar_upstream_duration_seconds",
            "Time from sending a request upstream to the upstream's answer head (both sends of a replay), by route",
            ((route, stats.upstream) for route, stats in metrics.routes.items()),
        )

    def _tokens(self) -> Iterator[Metric]:
        providers = self._parts.providers
        grants = [provider.grant for provider in providers]

        def total(values: Iterable[float]) -> float:
            return float(sum(values))

        yield _outcomes(
            "sidecar_token_requests",
            "HTTP requests to the token endpoint, by outcome: success, permanent (a person must act), transient, "
            "throttled",
            REQUEST_OUTCOMES,
            (grant.endpoint.outcomes for grant in grants),
        )
        yield _outcomes(
            "sidecar_token_refreshes",
            "Token refreshes by outcome: success, permanent (a person must act), transient, throttled, clock_skew "
            "(the token arrived nearly expired by this machine's clock), unusable (not the configured kind, or not "
            "a JWT), store_unavailable (the token store is out of reach and the credential rotates)",
            REFRESH_OUTCOMES,
            (provider.outcomes for provider in providers),
        )
        duration = Histogram()
        for provider in providers:
            duration.merge(provider.durations)
        family = HistogramMetricFamily(
            "sidecar_token_refresh_duration_seconds", "Duration of token refreshes, whatever their outcome"
        )
        family.add_metric([], duration.cumulative(), duration.sum)
        yield family
        yield CounterMetricFamily(
            "sidecar_token_waits",
            "Requests that waited for a token request because no valid token was held",
            value=total(p.waits for p in providers),
        )
        yield GaugeMetricFamily(
            "sidecar_token_consecutive_failures",
            "Failed refreshes since the last success (the largest over credentials)",
            value=max((p.schedule.failures_in_row for p in providers), default=0),
        )
        yield CounterMetricFamily(
            "sidecar_secret_refusals",
            "New secret file values Cognito refused while the previous ones still worked (those stayed in use)",
            value=total(p.new_secrets.refused_count for p in providers),
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
            "Seconds until the soonest cached token expires (0: a credential has none valid)",
            value=min(remaining) if len(remaining) == len(providers) else 0.0,
        )
        refused = any(p.last_error is not None and p.last_error.permanent for p in providers)
        yield GaugeMetricFamily(
            "sidecar_token_permanent_failure",
            "1 while Cognito refuses a credential (a person must act)",
            value=1.0 if refused else 0.0,
        )
        yield from self._store([p.shared for p in providers if p.shared is not None])

    def _store(self, shared: list[SharedRefresh]) -> Iterator[Metric]:
        if not shared:
            return  # the memory store: nothing shared, nothing to count
        counts = {
            "adopted": ("Token sets taken from the token store, refreshed by another sidecar", "adopted"),
            "lock_waits": ("Refreshes that waited for another sidecar's refresh lease", "lock_waits"),
            "takeovers": (
                "Refresh leases taken over after their holder ended without releasing them (killed or hung)",
                "takeovers",
            ),
            "errors": ("Token store operations that failed (unreachable, timed out, unreadable)", "errors"),
            "fallbacks": (
                "Refreshes done without the store because it was out of reach (non-rotating credentials only)",
                "fallbacks",
            ),
        }
        for name, (help_text, attribute) in counts.items():
            value = float(sum(getattr(each, attribute) for each in shared))
            yield CounterMetricFamily(f"sidecar_token_store_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            "sidecar_token_store_trouble",
            "1 while the token store is out of reach or its last operation failed",
            value=1.0 if any(each.problem for each in shared) else 0.0,
        )

    def _sidecar(self) -> Iterator[Metric]:
        forwarders = self._parts.forwarders
        yield CounterMetricFamily(
            "sidecar_upstream_replays",
            "Requests replayed once after API Gateway refused the token",
            value=float(sum(f.replays for f in forwarders)),
        )
        yield from self._egress()
        errors = CounterMetricFamily("sidecar_errors", "The sidecar's own error answers, by code", labels=["code"])
        for code, count in sorted(self._parts.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield GaugeMetricFamily("sidecar_draining", "1 while shutting down", value=1.0 if self._parts.draining else 0.0)
        info = GaugeMetricFamily("sidecar_build_info", "Always 1: the running version", labels=["version", "python"])
        info.add_metric([__version__, platform.python_version()], 1.0)
        yield info

    def _egress(self) -> Iterator[Metric]:
        failures = CounterMetricFamily(
            "sidecar_egress_failures",
            "Requests that failed on the way out, before the target answered, by target (token_endpoint, upstream) "
            "and code: the egress proxy refused (egress_proxy_refused, egress_proxy_auth_required), could not be "
            "reached (egress_proxy_unreachable) or could not reach the target (egress_proxy_cannot_reach); a "
            "certificate did not verify (*_tls_untrusted); the upstream refused the client certificate "
            "(upstream_tls_refused)",
            labels=["target", "code"],
        )
        by_target = (
            ("token_endpoint", [provider.grant.endpoint.egress_failures for provider in self._parts.providers]),
            ("upstream", [forwarder.egress_failures for forwarder in self._parts.forwarders]),
        )
        for target, counters in by_target:
            total: Counter[str] = Counter()
            for counter in counters:
                total.update(counter)
            for code, count in sorted(total.items()):
                failures.add_metric([target, code], count)
        yield failures
        expiry = GaugeMetricFamily(
            "sidecar_client_certificate_expiry_timestamp_seconds",
            "When the client certificate presented to the upstream (mutual TLS) expires, as a Unix time, by route",
            labels=["route"],
        )
        for route in self._parts.routes:
            tls = route.forwarder.tls
            if tls is not None and tls.certificate is not None:
                expiry.add_metric([route.label], tls.certificate.expires_at)
        yield expiry


def sidecar_registry(parts: _Parts, clock: Clock = SYSTEM_CLOCK) -> CollectorRegistry:
    """The default registry's collectors (process and runtime), then ``parts``'s counts."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(REGISTRY)
    registry.register(SidecarCollector(parts, clock))
    return registry


# Metric types whose samples add up across the workers of one sidecar; the others (gauges, info) are told per
# worker, with a ``worker`` label, since their sum means nothing.
_SUMMED = frozenset({"counter", "histogram", "summary"})


def snapshot(registry: CollectorRegistry) -> bytes:
    """``registry``'s families now, as JSON, for another worker's ``merge``."""
    families = [
        [family.name, family.type, family.documentation, family.unit, [s[:3] for s in family.samples]]
        for family in registry.collect()
    ]
    return json.dumps(families, separators=(",", ":")).encode()


def merge(snapshots: Mapping[int, bytes], workers: int) -> CollectorRegistry:
    """One registry for the whole sidecar from its workers' snapshots (by worker number): counters and histograms
    summed, every other sample with a ``worker`` label; and how many of the ``workers`` are in it."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for number, raw in sorted(snapshots.items()):
        for name, kind, documentation, unit, samples in json.loads(raw):
            if name not in families:
                families[name] = Metric(name, documentation, kind, unit)
                values[name] = {}
            merged = values[name]
            for sample, labels, value in samples:
                if kind in _SUMMED:
                    key = (sample, tuple(sorted(labels.items())))
                    before = merged.get(key)
                    if before is None:
                        merged[key] = value
                    else:  # a counter's creation time is the earliest; anything else adds up
                        merged[key] = min(before, value) if sample.endswith("_created") else before + value
                else:
                    merged[(sample, tuple(sorted({**labels, "worker": str(number)}.items())))] = value
    for name, family in families.items():
        for (sample, labels), value in values[name].items():
            family.add_sample(sample, dict(labels), value)
    reporting = GaugeMetricFamily(
        "sidecar_workers_reporting",
        f"Workers whose counts are in this scrape, of {workers}; one restarting or stuck is left out",
        value=float(len(snapshots)),
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families([*families.values(), reporting]))
    return registry


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The exposition and its content type: OpenMetrics when the scraper's ``Accept`` asks for it (Prometheus
    does), else the Prometheus text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


__all__ = ["SidecarCollector", "merge", "render", "sidecar_registry", "snapshot"]
