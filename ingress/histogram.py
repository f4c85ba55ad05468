"""Latency histograms bumped on the hot path: a list of ints and a float, nothing else.

The Prometheus collector (ingress.metrics) turns them into cumulative buckets at scrape time,
so a request pays one bisect and two additions. The bounds span sub-millisecond proxying and
multi-second cold starts and queue waits, the two things operators look at here.
"""

from __future__ import annotations

from bisect import bisect_left

# seconds; an observation equal to a bound falls in that bound's bucket ("le")
BOUNDS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)  # fmt: skip


class Histogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs as Prometheus wants them, +Inf last."""
        out = []
        running = 0
        for bound, count in zip(BOUNDS, self.counts, strict=False):
            running += count
            out.append((repr(bound), float(running)))
        running += self.counts[-1]
        out.append(("+Inf", float(running)))
        return out
