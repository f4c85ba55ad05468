"""The collector (Window) and the decider (decide), driven by a fake clock in 100 ms steps."""

from __future__ import annotations

import itertools
import math
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.decide import Autoscaling, DecideState, Decision, Observed, decide
from scaler.window import Window

TICK = 0.1  # seconds between the ingress's stats snapshots
T0 = 1000.0  # the fake monotonic clock's start


class Spec(msgspec.Struct, frozen=True, kw_only=True):
    """The four autoscaling settings, as the service file would give them."""

    min_size: int = 1
    max_size: int = 25
    max_concurrency: int = 100
    scale_down_delay: float = 60.0


class Sim:
    """A service: a Window fed each tick, decide() called, and instances that follow it.

    Instances asked for become ready ``start_delay`` seconds later; removed ones go at once.
    """

    def __init__(self, spec: Autoscaling, *, start_delay: float = 0.0) -> None:
        self.spec = spec
        self.start_delay = start_delay
        self.now = T0
        self.window = Window()
        self.state = DecideState(desired=spec.min_size)
        self.ready = spec.min_size
        self.starting: list[float] = []  # when each starting instance becomes ready
        self.history: list[tuple[float, int]] = []  # (time, desired) after every tick
        self.decision = Decision(desired=spec.min_size, reason="")

    def tick(self, demand: int) -> Decision:
        self.now += TICK
        now = self.now
        ready_now = [t for t in self.starting if t <= now]
        self.ready += len(ready_now)
        self.starting = [t for t in self.starting if t > now]
        inflight = min(demand, self.ready * self.spec.max_concurrency)
        self.window.add(now, inflight, demand - inflight)
        observed = Observed(
            stable_avg=self.window.stable_average(now),
            panic_avg=self.window.panic_average(now),
            current_demand=self.window.current_demand,
            ready=self.ready,
            starting=len(self.starting),
            last_request_time=self.window.last_request_time,
        )
        self.decision, self.state = decide(observed, self.spec, self.state, now)
        self._actuate(self.decision.desired)
        self.history.append((now, self.decision.desired))
        return self.decision

    def run(self, seconds: float, demand: int) -> None:
        """Tick for ``seconds`` at a constant demand."""
        for _ in range(round(seconds / TICK)):
            self.tick(demand)

    def _actuate(self, desired: int) -> None:
        have = self.ready + len(self.starting)
        if desired > have:
            self.starting += [self.now + self.start_delay] * (desired - have)
        while desired < self.ready + len(self.starting):
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1

    def desired_between(self, start: float, end: float) -> list[int]:
        """Desired counts decided at times in [start, end) since the simulation began."""
        return [d for t, d in self.history if T0 + start <= t < T0 + end]


def _changes(values: list[int]) -> int:
    return sum(a != b for a, b in itertools.pairwise(values))


def observed(
    *,
    stable: float = 0.0,
    panic: float | None = None,
    demand: int | None = None,
    ready: int = 1,
    last: float | None = None,
) -> Observed:
    """An Observed whose panic average and demand default to the stable average.

    The last request defaults to now when there is any demand, to never when there is none.
    """
    if demand is None:
        demand = round(stable)
    if last is None and (demand or stable):
        last = T0
    return Observed(
        stable_avg=stable,
        panic_avg=stable if panic is None else panic,
        current_demand=demand,
        ready=ready,
        last_request_time=last,
    )


# --- the window ---------------------------------------------------------------------------


def test_constant_demand_averages_to_itself() -> None:
    """A constant demand gives that value in both windows, full or not."""
    window = Window()
    for i in range(1, 1000):
        window.add(T0 + i * TICK, 200, 50)
        if i in (1, 30, 999):
            now = T0 + i * TICK
            assert window.stable_average(now) == pytest.approx(250.0)
            assert window.panic_average(now) == pytest.approx(250.0)


def test_average_is_time_weighted_not_per_sample() -> None:
    """A burst of closely spaced samples counts for the time it covers, not its count."""
    window = Window(stable=10.0, panic=1.0)
    window.add(T0, 100, 0)
    for i in range(1, 100):  # 99 samples of 0 within 10 ms
        window.add(T0 + 5.0 + i * 0.0001, 0, 0)
    # 100 held for 5 s, then 0 for 5 s.
    assert window.stable_average(T0 + 10.0) == pytest.approx(50.0, rel=1e-3)


def test_gap_holds_the_last_value() -> None:
    """With no sample for a while, the last known demand is taken to continue."""
    window = Window()
    window.add(T0, 0, 0)
    window.add(T0 + 1.0, 300, 0)
    assert window.panic_average(T0 + 30.0) == pytest.approx(300.0)
    assert window.stable_average(T0 + 31.0) == pytest.approx(300.0 * 30.0 / 31.0)
    assert window.stable_average(T0 + 61.0) == pytest.approx(300.0)


def test_young_window_averages_the_time_it_has() -> None:
    """Before a window is full the average is over the time since the first sample."""
    window = Window()
    window.add(T0, 40, 0)
    window.add(T0 + 2.0, 0, 0)
    assert window.stable_average(T0 + 4.0) == pytest.approx(20.0)
    assert window.stable_average(T0) == 40.0
    assert Window().stable_average(T0) == 0.0


def test_old_demand_leaves_the_window() -> None:
    """Demand older than a window no longer counts in it."""
    window = Window()
    now = T0
    window.add(now, 500, 0)
    for _ in range(70):  # 7 s of nothing: gone from the panic window, not from the stable
        now += TICK
        window.add(now, 0, 0)
    window.add(now + 3.0, 0, 0)
    assert window.panic_average(now + 3.0) == 0.0
    assert window.stable_average(now + 3.0) > 0.0
    assert window.stable_average(now + 61.0) == 0.0


def test_memory_is_bounded_by_the_window() -> None:
    """Ten thousand samples per second for a minute keep ~600 segments per window."""
    window = Window()
    for i in range(600_000 // 10):
        window.add(T0 + i * 0.001, i % 7, 0)
    assert len(window) <= 2 * 602
    assert window.stable_average(T0 + 60.0) == pytest.approx(3.0, rel=0.01)


def test_last_request_time_and_arrivals() -> None:
    """last_request_time is the last sample with demand, or with arrivals between samples."""
    window = Window()
    seen = [window.last_request_time]
    window.add(T0, 0, 0)
    seen.append(window.last_request_time)
    window.add(T0 + 0.1, 0, 3)
    window.add(T0 + 0.2, 0, 0)
    seen.append(window.last_request_time)
    window.add(T0 + 0.3, 0, 0, arrivals=2)
    seen.append(window.last_request_time)
    assert seen == [None, None, T0 + 0.1, T0 + 0.3]


def test_late_sample_counts_as_now() -> None:
    """A sample older than the previous one replaces its value instead of rewriting history."""
    window = Window()
    window.add(T0, 10, 0)
    window.add(T0 + 1.0, 20, 0)
    window.add(T0 + 0.5, 30, 0)
    assert window.current_demand == 30
    assert window.stable_average(T0 + 2.0) == pytest.approx(20.0)


@settings(max_examples=50, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0.1, 3.0), st.integers(0, 1000)), min_size=1, max_size=200),
    query_delay=st.floats(0.0, 10.0),
)
def test_running_sums_match_a_recomputed_integral(
    steps: list[tuple[float, int]], query_delay: float
) -> None:
    """For irregular samples, the O(1) averages equal the integral recomputed from scratch."""
    window = Window()
    samples = [(T0, 0)]
    window.add(T0, 0, 0)
    now = T0
    for gap, demand in steps:
        now += gap
        samples.append((now, demand))
        window.add(now, demand, 0)
    query = now + query_delay
    for length, average in ((60.0, window.stable_average), (6.0, window.panic_average)):
        horizon = max(query - length, T0)
        area = 0.0
        for (t, d), (t_next, _) in zip(samples, [*samples[1:], (query, 0)], strict=True):
            area += d * max(0.0, min(t_next, query) - max(t, horizon))
        expected = area / (query - horizon) if query > horizon else samples[-1][1]
        assert average(query) == pytest.approx(expected, rel=1e-9, abs=1e-6)


# --- the decision, one call at a time -------------------------------------------------------


@pytest.mark.parametrize(
    ("obs", "spec", "state", "expected"),
    [
        pytest.param(
            observed(demand=1, ready=0),
            Spec(min_size=0),
            DecideState(desired=0),
            1,
            id="cold-start-one-request",
        ),
        pytest.param(
            observed(demand=1, ready=0),
            Spec(min_size=0, max_size=0),
            DecideState(desired=0),
            0,
            id="cold-start-but-max-size-0",
        ),
        pytest.param(
            observed(stable=0.0, demand=0, ready=0),
            Spec(min_size=2),
            DecideState(desired=0),
            2,
            id="raise-to-min-size",
        ),
        pytest.param(
            observed(stable=9000.0, ready=25),
            Spec(),
            DecideState(desired=25),
            25,
            id="cap-at-max-size",
        ),
        pytest.param(
            observed(stable=250.0, ready=5),
            Spec(max_size=3),
            DecideState(desired=5),
            3,
            id="max-size-lowered-applies-at-once",
        ),
        pytest.param(
            observed(stable=250.0, ready=3),
            Spec(),
            DecideState(desired=3),
            3,
            id="steady-holds",
        ),
        pytest.param(
            observed(stable=301.0, ready=3),
            Spec(),
            DecideState(desired=3),
            4,
            id="stable-up-at-once",
        ),
        pytest.param(
            observed(stable=150.0, ready=3),
            Spec(),
            DecideState(desired=3, scale_down_candidate_since=T0 - 59.9),
            3,
            id="down-waits-for-delay",
        ),
        pytest.param(
            observed(stable=150.0, ready=3),
            Spec(),
            DecideState(desired=3, scale_down_candidate_since=T0 - 60.0),
            2,
            id="down-after-delay",
        ),
        pytest.param(
            observed(stable=190.0, ready=3),
            Spec(),
            DecideState(desired=3, scale_down_candidate_since=T0 - 600.0),
            3,
            id="down-needs-headroom",
        ),
        pytest.param(
            observed(stable=0.5, demand=0, ready=3, last=T0 - 10.0),
            Spec(min_size=0),
            DecideState(desired=3, scale_down_candidate_since=T0 - 600.0),
            1,
            id="down-stops-at-one-while-recent",
        ),
        pytest.param(
            observed(stable=3.0, demand=0, ready=3, last=T0 - 60.0),
            Spec(min_size=0),
            DecideState(desired=3),
            0,
            id="idle-for-delay-to-zero",
        ),
        pytest.param(
            observed(stable=3.0, demand=0, ready=3, last=T0 - 60.0),
            Spec(min_size=2),
            DecideState(desired=3),
            2,
            id="idle-for-delay-to-min-size",
        ),
        pytest.param(
            observed(stable=0.0, demand=0, ready=1, last=T0 - 59.0),
            Spec(min_size=0),
            DecideState(desired=1, scale_down_candidate_since=T0 - 600.0),
            1,
            id="zero-waits-for-idle-delay",
        ),
        pytest.param(
            observed(stable=10.0, panic=10.0, demand=230, ready=1),
            Spec(max_size=25),
            DecideState(desired=1),
            3,
            id="panic-on-current-demand",
        ),
        pytest.param(
            observed(stable=10.0, panic=10.0, demand=230, ready=1),
            Spec(max_size=2),
            DecideState(desired=1),
            2,
            id="panic-capped",
        ),
        pytest.param(
            observed(stable=100.0, panic=400.0, demand=100, ready=2),
            Spec(),
            DecideState(desired=2),
            4,
            id="panic-on-6s-average",
        ),
        pytest.param(
            observed(stable=100.0, panic=300.0, demand=100, ready=2),
            Spec(),
            DecideState(desired=2),
            2,
            id="under-panic-threshold",
        ),
        pytest.param(
            observed(stable=10.0, demand=10, ready=8),
            Spec(),
            DecideState(desired=8, panicking_until=T0 + 1.0, scale_down_candidate_since=T0 - 99),
            8,
            id="panic-never-down",
        ),
    ],
)
def test_decide_table(obs: Observed, spec: Spec, state: DecideState, expected: int) -> None:
    """One decision from a given observation, settings and state."""
    decision, new_state = decide(obs, spec, state, T0)
    assert decision.desired == expected, decision.reason
    assert new_state.desired == expected
    assert decision.reason


def test_reason_shows_the_numbers() -> None:
    """The reason names the mode, the demand, the ready count, the limit and the cap."""
    decision, state = decide(
        observed(stable=10.0, panic=10.0, demand=230, ready=1), Spec(max_size=2), DecideState(), T0
    )
    assert decision.reason.startswith("panic: demand 230")
    assert "1 ready x 100 -> 3 (clamped to [1, 2])" in decision.reason
    assert state.panicking_until == T0 + 60.0
    assert state.last_scale_up_at == T0


def test_bad_settings_are_refused() -> None:
    """Settings the service file would reject raise rather than divide by zero."""
    with pytest.raises(ValueError, match="max_concurrency=0"):
        decide(observed(), Spec(max_concurrency=0), DecideState(), T0)
    with pytest.raises(ValueError, match="min_size=3 max_size=2"):
        decide(observed(), Spec(min_size=3, max_size=2), DecideState(), T0)


# --- scenarios on a fake clock --------------------------------------------------------------


def test_cold_start_from_zero() -> None:
    """The first request to a service at zero asks for one instance on that very tick."""
    sim = Sim(Spec(min_size=0), start_delay=2.0)
    sim.run(5.0, 0)
    assert sim.decision.desired == 0
    assert sim.tick(1).desired == 1
    assert sim.decision.reason.startswith("cold start")
    sim.run(30.0, 1)
    assert set(sim.desired_between(5.05, 35.1)) == {1}


@pytest.mark.parametrize(
    ("max_size", "expected"),
    [pytest.param(25, 5, id="reaches-5"), pytest.param(3, 3, id="capped-at-3")],
)
def test_step_to_five_times_the_limit_panics_up_at_once(max_size: int, expected: int) -> None:
    """A step from 0 to 5 x max_concurrency reaches 5 (or max_size) on its first tick."""
    sim = Sim(Spec(max_size=max_size), start_delay=3.0)
    sim.run(30.0, 0)
    assert sim.tick(500).desired == expected
    assert sim.state.panicking_until is not None
    sim.run(120.0, 500)
    assert max(d for _, d in sim.history) == expected
    assert sim.decision.desired == expected


def test_panic_never_scales_down() -> None:
    """While panicking the desired count only rises, however the demand swings."""
    sim = Sim(Spec(), start_delay=1.0)
    sim.run(10.0, 50)
    rng = random.Random(7)
    for _ in range(300):  # 30 s of a demand swinging between 0 and 800
        sim.tick(rng.choice([0, 10, 800, 300]))
    panicking = [d for t, d in sim.history if t > T0 + 10.0]
    assert panicking == sorted(panicking)
    assert panicking[-1] == 8


def test_after_load_stops_nothing_goes_before_the_delay() -> None:
    """Once a steady load stops, instances stay for scale_down_delay, then step down."""
    delay = 30.0
    sim = Sim(Spec(min_size=1, scale_down_delay=delay), start_delay=1.0)
    sim.run(180.0, 450)  # panic on the step is long over
    assert sim.decision.desired == 5
    sim.run(delay - TICK, 0)
    assert set(sim.desired_between(180.0, 180.0 + delay - TICK)) == {5}
    sim.run(TICK * 2, 0)
    assert sim.decision.desired == 1  # idle for the delay: straight to min_size


def test_lower_load_steps_down_after_the_delay() -> None:
    """A load that falls but does not stop steps down once the lower count lasted the delay."""
    sim = Sim(Spec(scale_down_delay=20.0), start_delay=1.0)
    sim.run(180.0, 450)
    sim.run(180.0, 120)
    # The 60 s average needs ~16 s to fit 4 at 90%, then the 20 s delay runs.
    assert set(sim.desired_between(180.0, 200.0)) == {5}
    downs = [b for (_, a), (_, b) in itertools.pairwise(sim.history) if b < a]
    assert downs and downs == sorted(downs, reverse=True)
    assert sim.decision.desired == 2  # ceil(120 / (0.9 x 100))


def test_zero_only_after_idle_for_the_delay() -> None:
    """With min_size 0 the service reaches zero exactly once idle for scale_down_delay."""
    sim = Sim(Spec(min_size=0, scale_down_delay=45.0))
    sim.run(20.0, 30)
    sim.run(45.0 - TICK, 0)
    assert min(sim.desired_between(0.1, 65.0 - TICK)) == 1
    sim.run(2 * TICK, 0)
    assert sim.decision.desired == 0
    sim.run(120.0, 0)
    assert set(sim.desired_between(65.1, 185.0)) == {0}  # the 60 s tail brings nothing back


def test_steady_250_stays_at_3_for_ten_minutes() -> None:
    """A steady 250 at max_concurrency 100 is 3 instances from the first tick, for 10 minutes."""
    sim = Sim(Spec(min_size=0), start_delay=2.0)
    sim.run(600.0, 250)
    assert {d for _, d in sim.history} == {3}


@pytest.mark.parametrize(
    "base", [pytest.param(b, id=str(b)) for b in (99, 100, 101, 180, 199, 200, 201, 300, 1001)]
)
@pytest.mark.parametrize("delay", [pytest.param(d, id=f"delay-{d:g}s") for d in (0.0, 10.0)])
def test_load_on_a_boundary_does_not_flap(base: int, delay: float) -> None:
    """A noisy load right at a scale-up or scale-down boundary settles and stays put."""
    rng = random.Random(base)
    sim = Sim(Spec(scale_down_delay=delay), start_delay=1.0)
    for _ in range(4200):  # 7 minutes
        sim.tick(round(base * (1 + rng.uniform(-0.2, 0.2))))
    settled = sim.desired_between(180.0, 420.1)
    assert _changes(settled) <= 1


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32), noise=st.floats(0.0, 0.2))
def test_steady_250_with_noise_stays_at_3(seed: int, noise: float) -> None:
    """A demand of 250 +-20% per sample never moves 3 instances in 10 minutes."""
    rng = random.Random(seed)
    sim = Sim(Spec(min_size=0), start_delay=2.0)
    for _ in range(6000):
        sim.tick(round(250 * (1 + rng.uniform(-noise, noise))))
    assert {d for _, d in sim.history} == {3}


def _near(boundary: int) -> st.SearchStrategy[int]:
    """Loads within 2 of a multiple of ``boundary``, where rounding decides the count."""
    return st.builds(lambda k, d: boundary * k + d, st.integers(1, 19), st.integers(-2, 2))


@settings(max_examples=25, deadline=None)
@given(
    base=st.one_of(st.integers(10, 2000), _near(100), _near(90)),
    noise=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**32),
    delay=st.sampled_from([0.0, 10.0, 60.0]),
)
def test_steady_noisy_load_never_flaps(base: int, noise: float, seed: int, delay: float) -> None:
    """Any steady load, boundaries included, settles in 3 minutes, then changes once at most."""
    rng = random.Random(seed)
    sim = Sim(Spec(scale_down_delay=delay), start_delay=1.0)
    for _ in range(4200):  # 7 minutes
        sim.tick(round(base * (1 + rng.uniform(-noise, noise))))
    settled = sim.desired_between(180.0, 420.1)
    assert _changes(settled) <= 1
    assert settled[-1] >= math.ceil(base * (1 - noise) / 100 - 1e-9)
