"""One scrape for the workers of one sidecar: their snapshots merged (counters and histograms summed, gauges
per worker), in both exposition formats. Pure functions over real prometheus-client registries."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from proxy.metrics import merge, render, snapshot
from tests.conftest import metric


def _worker(requests: int, seconds: list[float], in_flight: int) -> bytes:
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests", ["route"], registry=registry)
    counter.labels("/").inc(requests)
    histogram = Histogram("demo_duration_seconds", "Durations", buckets=(0.1, 1.0), registry=registry)
    for each in seconds:
        histogram.observe(each)
    Gauge("demo_in_flight", "In flight", registry=registry).set(in_flight)
    return snapshot(registry)


def test_counters_and_histograms_add_up_and_gauges_are_told_per_worker():
    merged = merge({0: _worker(3, [0.05, 2.0], 1), 1: _worker(4, [0.5], 5)}, workers=3)
    text, content_type = render(merged, None)
    exposition = text.decode()
    assert content_type.startswith("text/plain")
    assert metric(exposition, "demo_requests_total", route="/") == 7
    assert metric(exposition, "demo_duration_seconds_bucket", le="0.1") == 1
    assert metric(exposition, "demo_duration_seconds_bucket", le="1.0") == 2
    assert metric(exposition, "demo_duration_seconds_count") == 3
    assert metric(exposition, "demo_duration_seconds_sum") == 2.55
    assert metric(exposition, "demo_in_flight", worker="0") == 1
    assert metric(exposition, "demo_in_flight", worker="1") == 5
    assert metric(exposition, "sidecar_workers_reporting") == 2  # of 3: one did not answer
    created = [
        s.value
        for f in openmetrics_families(render(merged, "application/openmetrics-text")[0].decode())
        for s in f.samples
        if s.name == "demo_requests_created"
    ]
    assert len(created) == 1  # the earliest worker's, not a sum


def test_a_snapshot_is_what_the_registry_holds_now():
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests", registry=registry)
    before = snapshot(registry)
    counter.inc()
    assert metric(render(merge({0: before}, 1), None)[0].decode(), "demo_requests_total") == 0
    assert metric(render(merge({0: snapshot(registry)}, 1), None)[0].decode(), "demo_requests_total") == 1
