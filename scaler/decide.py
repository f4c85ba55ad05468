"""How many instances a service should have: the decider, a pure function.

``decide(observed, spec, state, now) -> (Decision, new_state)`` takes what the collector
(:class:`scaler.window.Window`) and the runtime saw, the service's autoscaling settings and
the state the previous call returned, and gives the desired instance count with the numbers
behind it. It does no I/O and reads no clock; starting and stopping instances (grace
periods, draining, the cold-start signal) is the actuator's business. It follows Knative's
KPA (``pkg/autoscaler/scaling/autoscaler.go``), with App Runner's hard per-instance limit as
the target. The rules:

- **Capacity covers demand.** ``demand`` is in-flight plus queued requests; ``n`` instances
  carry ``n * max_concurrency``, so a load wants ``ceil(load / max_concurrency)``.
- **Stable mode** follows the 60 s average: up at once, down only as below.
- **Panic mode** (Knative's, threshold 200%): when the 6 s average or the current demand
  wants at least twice the ready instances (at least one counted), scale up to it at once,
  and for the stable window (60 s) after the condition last held, never scale down.
- **Cold start.** Any demand with nothing desired wants one instance at once.
- **Scale down** only when the stable average has fitted in fewer instances continuously for
  ``scale_down_delay``; then step down to that many. "Fits" leaves 10% headroom
  (``SCALE_DOWN_HEADROOM``): up at ``load > n * max_concurrency``, down to ``n`` only at
  ``load <= 0.9 * n * max_concurrency``. The band between the two is what stops a steady
  load sitting on a boundary from flapping; the delay alone would only slow the flapping.
- **Zero** is reached only by idleness: no demand seen for ``scale_down_delay`` (the
  contract's "idle time before instances are removed (and before zero)"), and only when
  ``min_size`` is 0. Idleness also takes a larger service straight down to ``min_size``.
- **Always within [min_size, max_size]**, at once when the settings change.
"""

from __future__ import annotations

import math
from typing import Protocol

import msgspec

from scaler.window import PANIC_WINDOW, STABLE_WINDOW

PANIC_THRESHOLD = 2.0  # panic when wanted / ready >= this; Knative's default is 200%
SCALE_DOWN_HEADROOM = 0.9  # scale down to n only when the load fits n at 90% (see above)
_EPSILON = 1e-9  # instances; averages of a steady 300 come out as 300.0000000001


class Autoscaling(Protocol):
    """The four autoscaling settings decide() reads (service file, contract section 1)."""

    @property
    def min_size(self) -> int:
        """Instances kept even when idle; 0 allows scale to zero."""
        ...

    @property
    def max_size(self) -> int:
        """Instances never exceeded."""
        ...

    @property
    def max_concurrency(self) -> int:
        """In-flight requests one instance takes at most (>= 1)."""
        ...

    @property
    def scale_down_delay(self) -> float:
        """Seconds a lower desired count (or idleness) must last before instances go."""
        ...


class Observed(msgspec.Struct, frozen=True, kw_only=True):
    """One service as the collector and the runtime see it at ``now``."""

    stable_avg: float  # mean in-flight + queued requests over the stable window (60 s)
    panic_avg: float  # the same over the panic window (6 s)
    current_demand: int  # in-flight + queued requests in the latest sample
    ready: int  # instances taking requests
    starting: int = 0  # instances started and not ready yet
    last_request_time: float | None = None  # last time any demand was seen; None: never


class DecideState(msgspec.Struct, frozen=True, kw_only=True):
    """What decide() remembers between calls; start from ``DecideState(desired=n)``."""

    desired: int = 0  # the last decision
    panicking_until: float | None = None  # panic mode lasts until this time
    last_scale_up_at: float | None = None  # when desired last rose (status and events)
    scale_down_candidate_since: float | None = None  # since when fewer instances would do


class Decision(msgspec.Struct, frozen=True):
    """The outcome of one decide() call."""

    desired: int  # instances the service should have, within [min_size, max_size]
    reason: str  # the rule and the numbers behind it, for the scaler's log


def decide(
    observed: Observed, spec: Autoscaling, state: DecideState, now: float
) -> tuple[Decision, DecideState]:
    """The desired instance count at ``now`` and the state to pass to the next call."""
    lo, hi, per = spec.min_size, spec.max_size, spec.max_concurrency
    if per < 1 or not 0 <= lo <= hi:
        raise ValueError(f"bad autoscaling: min_size={lo} max_size={hi} max_concurrency={per}")
    delay = spec.scale_down_delay
    demand = observed.current_demand
    ready = observed.ready

    def clamp(n: int) -> int:
        return min(max(n, lo), hi)

    def cap(n: int) -> str:
        return f" (clamped to [{lo}, {hi}])" if clamp(n) != n else ""

    stable_up = _instances(observed.stable_avg, per)
    stable_down = _instances(observed.stable_avg, per * SCALE_DOWN_HEADROOM)
    panic_load = max(observed.panic_avg, float(demand))
    panic_want = _instances(panic_load, per)

    panicking_until = state.panicking_until
    # Compare the unrounded load, as Knative does: rounding up would make one request over a
    # single instance's capacity (101 at 100) a 200% "panic" and flap a steady load.
    if panic_load / per >= PANIC_THRESHOLD * max(ready, 1):
        panicking_until = now + STABLE_WINDOW
    elif panicking_until is not None and now >= panicking_until:
        panicking_until = None

    idle = demand == 0 and (
        observed.last_request_time is None or now - observed.last_request_time >= delay
    )
    current = clamp(state.desired)
    candidate: float | None = None
    stable_text = f"{STABLE_WINDOW:g}s avg {observed.stable_avg:.1f} / {per}"

    if panicking_until is not None:
        want = max(panic_want, stable_up)
        starting = f" (+{observed.starting} starting)" if observed.starting else ""
        desired = max(current, clamp(want))
        reason = (
            f"panic: demand {demand} ({PANIC_WINDOW:g}s avg {observed.panic_avg:.1f})"
            f" over {ready} ready{starting} x {per} -> {want}{cap(want)};"
            f" no scale-down for {panicking_until - now:.1f}s"
        )
    elif idle:
        # Before the stable average: its tail still remembers demand that has ended.
        desired = lo
        last = observed.last_request_time
        seen = "no request seen" if last is None else f"no demand for {now - last:.1f}s"
        reason = f"idle: {seen} (delay {delay:g}s) -> min_size {lo}"
    elif clamp(stable_up) > current:
        desired = clamp(stable_up)
        reason = f"scale up: {stable_text} -> {stable_up}{cap(stable_up)}"
    elif demand > 0 and current == 0:
        desired = clamp(1)
        reason = f"cold start: demand {demand} with nothing desired -> 1{cap(1)}"
    else:
        # Never to zero here: that takes idleness, handled above.
        target = max(clamp(stable_down), min(current, 1))
        floor = " (zero only when idle)" if target > clamp(stable_down) else cap(stable_down)
        desired = current
        if target < current:
            candidate = state.scale_down_candidate_since
            if candidate is None:
                candidate = now
            below = now - candidate
            if below >= delay:
                desired, candidate = target, None
                reason = (
                    f"scale down: {stable_text} fits {stable_down} at"
                    f" {SCALE_DOWN_HEADROOM:.0%} for {below:.1f}s (delay {delay:g}s)"
                    f" -> {target}{floor}"
                )
            else:
                reason = (
                    f"hold {current}: {stable_text} fits {stable_down} at"
                    f" {SCALE_DOWN_HEADROOM:.0%} for {below:.1f}s of {delay:g}s"
                )
        elif current != state.desired:
            reason = f"clamp: {state.desired} -> {current} (limits [{lo}, {hi}])"
        else:
            reason = f"hold {current}: {stable_text} -> {stable_up}{cap(stable_up)}"

    last_scale_up_at = now if desired > state.desired else state.last_scale_up_at
    new_state = DecideState(
        desired=desired,
        panicking_until=panicking_until,
        last_scale_up_at=last_scale_up_at,
        scale_down_candidate_since=candidate,
    )
    return Decision(desired=desired, reason=reason), new_state


def _instances(load: float, per_instance: float) -> int:
    """Instances needed to carry ``load`` at ``per_instance`` each."""
    return max(0, math.ceil(load / per_instance - _EPSILON))
