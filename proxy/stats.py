"""Counting on the hot path: a histogram that costs one bisect and two additions per observation.

prometheus-client's own ``Histogram`` and ``Counter`` take a lock and look up their labels on every call:
measured at 7.7 microseconds per request for the three series the sidecar keeps, against 0.5 for these plain
counts, which ``proxy.metrics`` turns into Prometheus families at scrape time. Everything runs on the event
loop's one thread, scrapes included, so nothing needs a lock. Imports nothing from the package.
"""

from __future__ import annotations

from bisect import bisect_left

# Upper bounds in seconds, for a sidecar: its own work is ~0.1 ms, API Gateway answers in milliseconds to
# its 29 s integration timeout, a token request in tens of milliseconds to the token timeout.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Observations counted per bucket (not cumulative; the last counts those above every bound) and summed."""

    __slots__ = ("bounds", "counts", "exemplars", "sum")

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        # With tracing on: the latest (trace id, value, Unix time) per bucket, shown as OpenMetrics exemplars.
        self.exemplars: dict[int, tuple[str, float, float]] = {}

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, float(running)))
        return out

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s observations (same bounds) to this one."""
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.sum += other.sum


__all__ = ["DURATION_BUCKETS", "Histogram"]
