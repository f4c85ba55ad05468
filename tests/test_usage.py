"""Tables for scaler.usage: the histogram quantile, recent rate and p99, instance-seconds."""

from __future__ import annotations

import pytest

from ingress.histogram import BOUNDS, Histogram
from ingress.messages import InstanceStats, ServiceStats
from scaler.usage import MAX_GAP, RECENT, Usage, quantile

NBUCKETS = len(BOUNDS) + 1  # +Inf last


def counts(**at: int) -> list[int]:
    """Bucket counts with ``b<i>=n`` set (``inf=n`` for the +Inf bucket), zero elsewhere."""
    out = [0] * NBUCKETS
    for key, n in at.items():
        out[-1 if key == "inf" else int(key[1:])] = n
    return out


def stats(
    arrivals: int, durations: list[int] | None = None, inflight: tuple[int, ...] = ()
) -> ServiceStats:
    """A sample with one instance per ``inflight`` entry (ids i0, i1, ...)."""
    instances = [
        InstanceStats(id=f"i{n}", state="ready", inflight=k) for n, k in enumerate(inflight)
    ]
    return ServiceStats(
        name="svc",
        inflight=sum(inflight),
        queued=0,
        arrivals=arrivals,
        completions=arrivals,
        instances=instances,
        durations=durations if durations is not None else counts(),
    )


def test_the_bounds_this_file_assumes() -> None:
    # the expected numbers below are computed from these buckets
    assert BOUNDS[0] == 0.0005
    assert (BOUNDS[6], BOUNDS[7]) == (0.05, 0.1)
    assert (BOUNDS[4], BOUNDS[9], BOUNDS[10]) == (0.01, 0.5, 1.0)
    assert BOUNDS[-1] == 120.0
    assert len(Histogram().counts) == NBUCKETS


# -- quantile ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # all 100 in (0.05, 0.1]: rank 99 of 100 is 99% of the way through the bucket
        (0.99, counts(b7=100), 0.05 + 0.05 * 0.99),
        (0.5, counts(b7=100), 0.075),
        (1.0, counts(b7=100), 0.1),
        # the first bucket's lower edge is 0, as in Prometheus
        (0.5, counts(b0=10), 0.00025),
        # half fast (0.005, 0.01], half slow (0.5, 1]: the median is the fast bucket's top
        (0.5, counts(b4=50, b10=50), 0.01),
        (0.99, counts(b4=50, b10=50), 0.5 + 0.5 * 49 / 50),
        (0.25, counts(b4=50, b10=50), 0.005 + 0.005 * 25 / 50),
        # empty buckets in between are skipped, not interpolated into
        (0.75, counts(b1=1, b9=3), 0.25 + 0.25 * 2 / 3),
        # a quantile in the +Inf bucket is the highest finite bound
        (0.99, counts(inf=5), 120.0),
        (0.995, counts(b7=99, inf=1), 120.0),
        # ... but only when it really falls there: 99 of 100 are in (0.05, 0.1]
        (0.99, counts(b7=99, inf=1), 0.1),
    ],
)
def test_quantile(q: float, buckets: list[int], expected: float) -> None:
    assert quantile(q, buckets) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("buckets", [[], counts()], ids=["no-buckets", "all-zero"])
def test_quantile_of_nothing_is_none(buckets: list[int]) -> None:
    assert quantile(0.99, buckets) is None


def test_quantile_of_observed_durations_lies_in_their_bucket() -> None:
    """Against the ingress's own Histogram: 0.3 s observations land in (0.25, 0.5]."""
    hist = Histogram()
    for _ in range(20):
        hist.observe(0.3)
    value = quantile(0.99, hist.counts)
    assert value is not None
    assert 0.25 < value <= 0.5


# -- requests per second and p99 ----------------------------------------------------------------


def test_one_sample_has_no_rate_and_no_p99() -> None:
    usage = Usage()
    usage.add(stats(50, counts(b7=50)), now=100.0)
    assert usage.requests_per_second() == 0.0
    assert usage.p99() is None


def test_rate_and_p99_are_differences_over_the_history() -> None:
    usage = Usage()
    usage.add(stats(1000, counts(b10=1000)), now=100.0)  # before: slow requests
    usage.add(stats(1010, counts(b7=10, b10=1000)), now=101.0)
    usage.add(stats(1020, counts(b7=20, b10=1000)), now=102.0)
    assert usage.requests_per_second() == pytest.approx(10.0)
    # only the 20 recent requests count, all in (0.05, 0.1]: the old slow ones are not recent
    assert usage.p99() == pytest.approx(0.05 + 0.05 * 0.99)


def test_no_request_ended_recently_gives_no_p99() -> None:
    usage = Usage()
    usage.add(stats(5, counts(b7=5)), now=0.0)
    usage.add(stats(5, counts(b7=5)), now=1.0)
    assert usage.requests_per_second() == 0.0
    assert usage.p99() is None


def test_samples_at_the_same_time_give_no_rate() -> None:
    usage = Usage()
    usage.add(stats(0), now=7.0)
    usage.add(stats(10), now=7.0)
    assert usage.requests_per_second() == 0.0


def test_old_samples_leave_the_span() -> None:
    """100 requests/s (all fast) for 5 s, then nothing: once the burst is over RECENT seconds
    old, rate and p99 show it no more; while part of it is in the span, exactly that part."""
    assert RECENT == 10.0
    usage = Usage()
    arrivals = 0
    for t in range(21):
        if t <= 5:
            arrivals = 100 * t
        usage.add(stats(arrivals, counts(b2=arrivals)), now=float(t))
        if t == 14:
            # the span is [4, 14]: arrivals went from 400 to 500
            assert usage.requests_per_second() == pytest.approx(10.0)
            assert usage.p99() == pytest.approx(0.001 + 0.0015 * 0.99)
    # at t = 20 the span is [10, 20]: no request arrived or ended in it
    assert usage.requests_per_second() == 0.0
    assert usage.p99() is None


def test_span_is_a_parameter() -> None:
    usage = Usage(span=2.0)
    for t, arrivals in [(0, 0), (1, 100), (2, 100), (3, 100)]:
        usage.add(stats(arrivals), now=float(t))
    # the span is [1, 3]: the 100 arrivals between 0 and 1 are out of it
    assert usage.requests_per_second() == 0.0


def test_sparse_samples_still_give_a_rate() -> None:
    """Two samples further apart than the span: the rate is over the two, not nothing."""
    usage = Usage()
    usage.add(stats(0), now=0.0)
    usage.add(stats(300), now=30.0)
    assert usage.requests_per_second() == pytest.approx(10.0)


def test_an_ingress_restart_costs_one_sample_not_a_negative_rate() -> None:
    usage = Usage()
    usage.add(stats(1000, counts(b10=1000)), now=0.0)
    usage.add(stats(1100, counts(b10=1100)), now=1.0)
    # the ingress restarted: its counters begin again from zero
    usage.add(stats(3, counts(b2=3)), now=2.0)
    assert usage.requests_per_second() == 0.0
    assert usage.p99() is None
    usage.add(stats(13, counts(b2=13)), now=3.0)
    # the new series alone: 10 requests in 1 s, all in (0.001, 0.0025]
    assert usage.requests_per_second() == pytest.approx(10.0)
    assert usage.p99() == pytest.approx(0.001 + 0.0015 * 0.99)


def test_durations_of_another_length_give_no_p99() -> None:
    usage = Usage()
    usage.add(stats(0, durations=[]), now=0.0)  # an ingress without duration buckets
    usage.add(stats(10, counts(b7=10)), now=1.0)
    assert usage.requests_per_second() == pytest.approx(10.0)
    assert usage.p99() is None


# -- instance-seconds ----------------------------------------------------------------------------


def test_the_first_sample_accounts_for_nothing() -> None:
    usage = Usage()
    usage.add(stats(0, inflight=(1, 0)), now=50.0)
    assert (usage.active_seconds, usage.idle_seconds) == (0.0, 0.0)


def test_active_and_idle_are_split_per_instance() -> None:
    usage = Usage()
    usage.add(stats(0, inflight=(0, 0)), now=0.0)
    usage.add(stats(1, inflight=(1, 0)), now=0.5)  # i0 busy, i1 idle, for 0.5 s each
    assert usage.active_seconds == pytest.approx(0.5)
    assert usage.idle_seconds == pytest.approx(0.5)
    usage.add(stats(4, inflight=(0, 3, 2)), now=0.75)  # i0 idle; i1 and a new i2 busy
    assert usage.active_seconds == pytest.approx(0.5 + 2 * 0.25)
    assert usage.idle_seconds == pytest.approx(0.5 + 0.25)


def test_no_instances_cost_nothing() -> None:
    usage = Usage()
    for t in range(5):
        usage.add(stats(0), now=float(t))
    assert (usage.active_seconds, usage.idle_seconds) == (0.0, 0.0)


def test_a_long_gap_is_capped() -> None:
    """After a stall only MAX_GAP per instance is billed; time going back bills nothing."""
    assert MAX_GAP == 1.0
    usage = Usage()
    usage.add(stats(0, inflight=(0, 0)), now=0.0)
    usage.add(stats(0, inflight=(1, 0)), now=30.0)
    assert usage.active_seconds == pytest.approx(MAX_GAP)
    assert usage.idle_seconds == pytest.approx(MAX_GAP)
    usage.add(stats(0, inflight=(1, 1)), now=29.0)  # a clock going backwards
    assert usage.active_seconds == pytest.approx(MAX_GAP)
    assert usage.idle_seconds == pytest.approx(MAX_GAP)
    usage.add(stats(0, inflight=(1, 1)), now=29.25)  # measured from the last sample
    assert usage.active_seconds == pytest.approx(MAX_GAP + 2 * 0.25)


def test_accounting_goes_on_across_an_ingress_restart() -> None:
    usage = Usage()
    usage.add(stats(100, inflight=(1,)), now=0.0)
    usage.add(stats(0, inflight=(1,)), now=0.1)  # counters back to zero
    assert usage.active_seconds == pytest.approx(0.1)
    assert usage.idle_seconds == 0.0


def test_a_restart_with_as_many_arrivals_is_seen_in_the_buckets() -> None:
    """A restarted ingress that has already counted as many arrivals as the old one is still
    a new series: its bucket counts went down."""
    usage = Usage()
    usage.add(stats(10, counts(b10=10)), now=0.0)
    usage.add(stats(10, counts(b2=10)), now=1.0)
    usage.add(stats(20, counts(b2=20)), now=2.0)
    assert usage.requests_per_second() == pytest.approx(10.0)
    assert usage.p99() is not None and usage.p99() <= 0.0025
