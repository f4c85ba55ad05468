"""Windowed demand per service: the collector half of collector -> decider -> actuator.

A :class:`Window` takes the ingress's samples of one service (in-flight plus queued requests,
streamed at least every 100 ms) and answers two averages, over the stable window (60 s) and
the panic window (6 s), as Knative's KPA does (``pkg/autoscaler/scaling/autoscaler.go``). It
does no I/O and never reads a clock: every call takes ``now``, on the same monotonic clock
as the samples (the ingress's ``StatsSnapshot.time``).

Its rules:

- **Time-weighted, not per sample.** Demand is a step function: each sample's value holds
  from its time until the next sample. An average is the integral of that function over the
  window divided by the time covered. Samples arrive irregularly (a slow scaler reads several
  snapshots at once, a busy ingress sends some late), and a plain mean of samples would give
  a burst of closely spaced samples more weight than the same demand sampled once. Weighting
  by time makes the answer independent of how often the ingress happened to report.
- **Gaps hold the last value.** No sample for a while means nothing is known, so the last
  known demand is assumed to continue: a scaler that loses its stream keeps what it has
  instead of scaling down on missing data.
- **A young window averages what it has.** Until a window has been filled, the average is
  over the time since the first sample, not padded with zeros (Knative does the same), so a
  new service's first burst counts at full weight.
- **O(1) amortized, bounded memory.** Closed segments sit in a deque per window with a
  running sum; old ones are evicted from the left. A new segment shorter than
  window/600 is merged into the previous one, so each window holds at most ~600 segments
  however fast samples come, and the error that merging introduces at the window's old edge
  is at most 1/600 of the window.
"""

from __future__ import annotations

import math
from collections import deque

STABLE_WINDOW = 60.0  # seconds; Knative's stable-window default
PANIC_WINDOW = 6.0  # seconds; Knative's default panic window is 10% of the stable window

# Each window keeps at most about this many segments (see the module docstring).
_SEGMENTS_PER_WINDOW = 600
# Running sums are recomputed from scratch this often, so float drift cannot build up.
_RESUM_EVERY = 8192


class _Segment:
    """Demand integrated over [start, end): ``area`` is request-seconds."""

    __slots__ = ("area", "end", "start")

    def __init__(self, start: float, end: float, area: float) -> None:
        self.start = start
        self.end = end
        self.area = area


class _Span:
    """A running integral over the last ``length`` seconds of closed segments."""

    __slots__ = ("_area", "_changes", "_resolution", "_segments", "length")

    def __init__(self, length: float) -> None:
        self.length = length
        self._resolution = length / _SEGMENTS_PER_WINDOW
        self._segments: deque[_Segment] = deque()
        self._area = 0.0
        self._changes = 0

    def __len__(self) -> int:
        return len(self._segments)

    def push(self, start: float, end: float, area: float) -> None:
        segments = self._segments
        last = segments[-1] if segments else None
        if last is not None and last.end == start and last.end - last.start < self._resolution:
            last.end = end
            last.area += area
        else:
            segments.append(_Segment(start, end, area))
        self._area += area
        self._evict(end)

    def integral(self, now: float) -> float:
        """Request-seconds of closed segments inside [now - length, now]."""
        self._evict(now)
        horizon = now - self.length
        area = self._area
        segments = self._segments
        if segments and segments[0].start < horizon:
            first = segments[0]
            # Demand is taken as uniform inside a (possibly merged) segment.
            area -= first.area * (horizon - first.start) / (first.end - first.start)
        return max(area, 0.0)

    def _evict(self, now: float) -> None:
        horizon = now - self.length
        segments = self._segments
        while segments and segments[0].end <= horizon:
            self._area -= segments.popleft().area
            self._changes += 1
        self._changes += 1
        if self._changes >= _RESUM_EVERY:
            self._area = math.fsum(s.area for s in segments)
            self._changes = 0


class Window:
    """Stable and panic averages of one service's demand (in-flight plus queued requests).

    ``stable`` and ``panic`` are window lengths in seconds (defaults 60 and 6).
    """

    __slots__ = (
        "_first_time",
        "_last_demand",
        "_last_request_time",
        "_last_time",
        "_panic",
        "_stable",
    )

    def __init__(self, stable: float = STABLE_WINDOW, panic: float = PANIC_WINDOW) -> None:
        if not 0 < panic <= stable:
            raise ValueError(f"need 0 < panic <= stable, got panic={panic} stable={stable}")
        self._stable = _Span(stable)
        self._panic = _Span(panic)
        self._first_time: float | None = None
        self._last_time = -math.inf
        self._last_demand = 0
        self._last_request_time: float | None = None

    def add(self, now: float, inflight: int, queued: int, *, arrivals: int = 0) -> None:
        """Record the demand seen at ``now``.

        ``arrivals`` (optional) is how many requests arrived since the previous sample, the
        difference of ``ServiceStats.arrivals``: a request that starts and ends between two
        samples is invisible in the in-flight count, but it still means the service is not
        idle. A sample older than the previous one is taken as happening at the same time.
        """
        demand = inflight + queued
        if self._first_time is None:
            self._first_time = now
        elif now > self._last_time:
            area = self._last_demand * (now - self._last_time)
            self._stable.push(self._last_time, now, area)
            self._panic.push(self._last_time, now, area)
        now = max(now, self._last_time)
        self._last_time = now
        self._last_demand = demand
        if demand > 0 or arrivals > 0:
            self._last_request_time = now

    def stable_average(self, now: float) -> float:
        """Time-weighted mean demand over the stable window ending at ``now``."""
        return self._average(self._stable, now)

    def panic_average(self, now: float) -> float:
        """Time-weighted mean demand over the panic window ending at ``now``."""
        return self._average(self._panic, now)

    @property
    def current_demand(self) -> int:
        """In-flight plus queued requests in the latest sample (0 before any)."""
        return self._last_demand

    @property
    def last_request_time(self) -> float | None:
        """When a sample last showed any demand (or arrivals); None if none ever did."""
        return self._last_request_time

    def __len__(self) -> int:
        """Segments held, over both windows: the memory this window uses."""
        return len(self._stable) + len(self._panic)

    def _average(self, span: _Span, now: float) -> float:
        if self._first_time is None:
            return 0.0
        now = max(now, self._last_time)
        horizon = now - span.length
        covered = now - max(self._first_time, horizon)
        if covered <= 0.0:
            return float(self._last_demand)
        # The latest sample's value holds from its time until now.
        open_part = self._last_demand * (now - max(self._last_time, horizon))
        return (span.integral(now) + open_part) / covered
