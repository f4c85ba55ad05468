"""What a service has been doing lately, from the ingress's cumulative counters: pure.

`tidegate status` shows requests per second and a p99 over the last few seconds, and the
cost accounting needs instance-seconds split into active (at least one request in flight)
and idle. The ingress sends cumulative counters (arrivals, per-bucket duration counts) and
per-instance in-flight counts every ~100 ms; :class:`Usage` keeps a short history of the
counters and takes differences, so a restarted ingress (counters back to zero) costs one
sample, not a negative rate. Time is passed in: the stats' own timestamps.
"""

from __future__ import annotations

import collections

from ingress.histogram import BOUNDS
from ingress.messages import ServiceStats

__all__ = ["MAX_GAP", "RECENT", "Usage", "quantile"]

RECENT = 10.0  # seconds of history behind requests/s and p99
# Seconds one sample may account for at most: after a stall (a suspended scaler, a lost
# subscription) the instances' state in between is unknown, so it is not billed.
MAX_GAP = 1.0


def quantile(q: float, counts: list[int]) -> float | None:
    """The ``q`` quantile of per-bucket ``counts`` (``BOUNDS`` buckets, +Inf last), linearly
    interpolated inside its bucket as Prometheus's histogram_quantile does; None if empty.

    A quantile in the +Inf bucket is reported as the highest finite bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            lower = BOUNDS[i - 1] if i > 0 else 0.0
            return lower + (BOUNDS[i] - lower) * (rank - seen) / count
        seen += count
    return BOUNDS[-1]


class Usage:
    """Recent rate and latency, and instance-seconds by activity, of one service."""

    __slots__ = ("_history", "_last_time", "_span", "active_seconds", "idle_seconds")

    def __init__(self, span: float = RECENT) -> None:
        self._span = span
        # (time, arrivals, duration counts) oldest first, covering at least the span
        self._history: collections.deque[tuple[float, int, list[int]]] = collections.deque()
        self._last_time: float | None = None
        self.active_seconds = 0.0  # instance-seconds with at least one request in flight
        self.idle_seconds = 0.0  # instance-seconds with none

    def add(self, stats: ServiceStats, now: float) -> None:
        """One sample from the ingress (``now`` on its clock)."""
        history = self._history
        if history and _restarted(history[-1], stats):
            history.clear()  # the ingress restarted: older counters are another series
        if self._last_time is not None:
            gap = min(max(now - self._last_time, 0.0), MAX_GAP)
            for inst in stats.instances:
                if inst.inflight > 0:
                    self.active_seconds += gap
                else:
                    self.idle_seconds += gap
        self._last_time = now
        history.append((now, stats.arrivals, stats.durations))
        # keep one sample at or before now - span, so differences cover the whole span
        while len(history) > 2 and history[1][0] <= now - self._span:
            history.popleft()

    def requests_per_second(self) -> float:
        if len(self._history) < 2:
            return 0.0
        (t0, a0, _), (t1, a1, _) = self._history[0], self._history[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0

    def p99(self) -> float | None:
        """Seconds; None when no request ended in the recent span."""
        if len(self._history) < 2:
            return None
        first, last = self._history[0][2], self._history[-1][2]
        if len(first) != len(last):
            return None
        return quantile(0.99, [b - a for a, b in zip(first, last, strict=True)])


def _restarted(last: tuple[float, int, list[int]], stats: ServiceStats) -> bool:
    """Cumulative counters that went down belong to a new series."""
    _, arrivals, durations = last
    if stats.arrivals < arrivals:
        return True
    if len(stats.durations) != len(durations):
        return False  # no buckets to compare (an ingress without them): p99 says None
    return any(now < before for now, before in zip(stats.durations, durations, strict=True))
