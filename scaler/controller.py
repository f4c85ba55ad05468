"""The actuator for one service: it applies decide()'s instance count to a runtime and the ingress.

Collector -> decider -> actuator: the :class:`~scaler.window.Window` collects demand, the pure
:func:`~scaler.decide.decide` says how many instances there should be, and a
:class:`ServiceController` makes it so. Its rules:

- **Nothing routed before it is healthy.** An instance starts in the runtime, is watched by
  the :class:`~scaler.health.HealthChecker`, and only when healthy becomes ``ready``; then the
  ingress gets the full list (ready plus draining) with ``put_instances``. Pushes are
  serialised in one task that always sends the latest list, so a slow push never lands after
  a newer one.
- **Drain before stop.** A removed instance is set ``draining`` at the ingress first (no new
  requests), and stopped in the runtime only after the ingress reports it drained or the
  drain time (the service's ``request_timeout``) runs out. Starting instances are removed
  first (they serve nothing), then the least loaded, newest ready ones.
- **Cold start at once.** A cold-start event with nothing starting or ready starts one
  instance without waiting for the next stats tick.
- **Replacement with back-off.** An instance that exits unasked, fails its health check, or
  never becomes healthy is replaced. Start failures in a row (the runtime refused, or the
  instance died or timed out before its first healthy check) delay the next start by 1 s,
  2 s, 4 s ... up to 60 s; the count resets once an instance becomes healthy. The back-off
  is visible in :meth:`ServiceController.status`.
- **Adoption on restart.** :meth:`ServiceController.start` first lists the runtime's
  instances of its service (they carry the service and revision labels): running ones are
  taken over and health-gated like new ones, so a restarted scaler starts no duplicate;
  exited ones are removed. Running ones of another revision keep serving while instances of
  the current one start, and are drained and stopped once those are ready. Instances of a
  service that no longer has a file are removed by :func:`remove_orphans`.
- **Time is injected.** ``clock`` gives the back-off's time; the stats' own timestamps drive
  the window and decide(). Timers only wake the controller up: what it then does is decided
  from the clock, so tests advance a fake clock and call :meth:`ServiceController.reconcile`.

Every change of the desired count is logged with decide()'s reason. With ``events`` (a
:class:`~scaler.logs.ServiceLogs`) each lifecycle point is also a record in the service's
system log (the same sentence, with its numbers as fields: :meth:`ServiceController._record`),
and each instance's output is collected into its app log from :meth:`Runtime.logs
<scaler.runtime.Runtime.logs>`, an adopted instance's from where the last scaler stopped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from ingress.control import ControlClient, ControlError
from ingress.histogram import Histogram
from ingress.messages import (
    ColdStartEvent,
    DrainedEvent,
    InstanceSpec,
    ServiceStats,
    StatsEvent,
)
from scaler.decide import DecideState, Observed, decide
from scaler.health import HealthChange, HealthChecker
from scaler.lifecycle import Event, InstanceState, transition
from scaler.logs import ServiceLogs
from scaler.messages import (
    ApplyAction,
    ColdStart,
    InstanceStatus,
    ScaleEvent,
    ServiceState,
    ServiceStatus,
)
from scaler.runtime import InstanceInfo, LaunchError, LaunchSpec, Runtime, RuntimeEvent
from scaler.spec import AutoscalingSpec, ServiceSpec, SpecError, resolve_secrets, routing_for
from scaler.usage import Usage
from scaler.window import Window

__all__ = [
    "BACKOFF_CAP",
    "BACKOFF_FIRST",
    "ServiceController",
    "audit_runtime",
    "dispatch_control_events",
    "dispatch_runtime_events",
    "remove_orphans",
]

_log = logging.getLogger("tidegate.scaler")

BACKOFF_FIRST = 1.0  # seconds before the start after a first failed one
BACKOFF_CAP = 60.0  # seconds at most between start attempts
STOP_GRACE = 10.0  # seconds between SIGTERM and kill when an instance is stopped
_RECENT = 10  # scale events and cold starts status shows
AUDIT_INTERVAL = 10.0  # seconds between comparisons with the runtime's own list
OUTPUT_DRAIN = 2.0  # seconds stop() waits for the stopped instances' last output
# seconds before subscribing again after the subscription broke: at once-ish (a restarted
# ingress is back in tens of milliseconds and knows nothing until resynced), doubling up to
# _RESUBSCRIBE_DELAY while it stays away
_RESUBSCRIBE_FIRST = 0.02
_RESUBSCRIBE_DELAY = 1.0

_S = InstanceState


@dataclass(eq=False)
class _Instance:
    id: str
    state: InstanceState
    created: float  # the controller's clock when the start was asked for
    address: str | None = None  # known once the runtime has started it
    launched: bool = False  # the runtime has it (stop() must be called to remove it)
    drain_timer: asyncio.TimerHandle | None = None
    adopted: bool = False  # found running at start, left by an earlier scaler
    outdated: bool = False  # of another revision: serves until the current one is ready


def backoff_delay(failures: int) -> float:
    """Seconds to wait before the next start after ``failures`` failed starts in a row."""
    if failures <= 0:
        return 0.0
    return min(BACKOFF_CAP, BACKOFF_FIRST * 2.0 ** min(failures - 1, 30))


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (bound to port 0, then closed)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServiceController:
    """Runs one service's instances: starts, health-gates, drains, stops and replaces them.

    ``workdir`` is the directory the process runtime runs the command in (the service file's);
    ``environ`` is where ``secrets: {env: ...}`` are read from; ``drain_timeout`` defaults to
    the service's ``request_timeout``, the longest an in-flight request may last; ``events``
    (None: none) gets the system records and the instances' output.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        runtime: Runtime,
        control: ControlClient,
        health: HealthChecker,
        *,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = _log,
        workdir: str | None = None,
        environ: Mapping[str, str] = os.environ,
        drain_timeout: float | None = None,
        stop_grace: float = STOP_GRACE,
        events: ServiceLogs | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._runtime = runtime
        self._control = control
        self._health = health
        self._clock = clock
        self._log = log
        self._workdir = workdir
        self._environ = environ
        self._drain_timeout_given = drain_timeout
        self._drain_timeout = spec.request_timeout if drain_timeout is None else drain_timeout
        self._stop_grace = stop_grace
        self._events = events
        self._revision = spec.spec_hash()
        self._instances: dict[str, _Instance] = {}
        self._window = Window()
        self._decide_state = DecideState(desired=spec.autoscaling.min_size)
        self._desired = spec.autoscaling.min_size
        self._last_reason = f"start: min_size {spec.autoscaling.min_size}"
        self._last_arrivals: int | None = None
        self._inflight: dict[str, int] = {}
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._cold_start_at: float | None = None
        self._last_cold_start: float | None = None
        self._scale_events = {"up": 0, "down": 0}
        self._paused = False
        # after pause: desired stays 0 whatever the stats say (draining instances still
        # report their in-flight requests) until a cold start or resume
        self._hold_zero = False
        self._last_stats: ServiceStats | None = None
        self.usage = Usage()
        self.cold_starts = Histogram()  # seconds from a request held at zero to ready
        # the last few, newest first, for status: (clock, direction, from, to, reason) and
        # (clock, seconds)
        self._recent_scales: collections.deque[tuple[float, str, int, int, str]] = (
            collections.deque(maxlen=_RECENT)
        )
        self._recent_cold_starts: collections.deque[tuple[float, float]] = collections.deque(
            maxlen=_RECENT
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._collectors: set[asyncio.Task[None]] = set()  # one per instance: its output
        self._leaving = False  # detached: the instances and their cursors stay for the next
        self._pusher: asyncio.Task[None] | None = None
        self._push_dirty = False
        self._started = False
        self._closing = False
        self._detached = False  # stopping without the ingress: nothing more is pushed
        self._gone = asyncio.Event()

    # -- the public surface ------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the instances an earlier scaler left running, put the service's routing at
        the ingress, then start what min_size still lacks.

        Instances the ingress is routing to right now (ready, at the same address) stay
        ready: they passed their checks a moment ago, and taking them out while they are
        checked again would hold every request of a scaler restart for a probe's time."""
        routed: dict[str, InstanceSpec] = {}
        try:
            for routing in await self._control.services():
                if routing.name == self.name:
                    routed = {i.id: i for i in routing.instances if i.state == "ready"}
        except ControlError as exc:
            self._log.warning("%s: reading the ingress's routing failed: %s", self.name, exc)
        await self._adopt(routed)
        # only now may stats start instances: before, adopted ones would not be counted
        self._started = True
        await self._control.put_service(routing_for(self.spec, self._routed_instances()))
        self._log.info(
            "%s: starting with min_size %d (max %d, %d per instance)",
            self.name,
            self.spec.autoscaling.min_size,
            self.spec.autoscaling.max_size,
            self.spec.autoscaling.max_concurrency,
        )
        self.reconcile()

    def on_stats(self, stats: ServiceStats, now: float) -> None:
        """A stats sample (``now`` on the ingress's clock): window, decide, apply."""
        if self._closing:
            return
        previous = self._last_arrivals
        arrivals = 0 if previous is None else stats.arrivals - previous
        if arrivals < 0:  # the ingress restarted its counters
            arrivals = stats.arrivals
        self._last_arrivals = stats.arrivals
        self._last_stats = stats
        self.usage.add(stats, now)
        self._window.add(now, stats.inflight, stats.queued, arrivals=arrivals)
        self._inflight = {i.id: i.inflight for i in stats.instances}
        if self._hold_zero:
            return
        window = self._window
        observed = Observed(
            stable_avg=window.stable_average(now),
            panic_avg=window.panic_average(now),
            current_demand=window.current_demand,
            ready=self._count(_S.READY),
            starting=self._count(_S.STARTING),
            last_request_time=window.last_request_time,
        )
        decision, self._decide_state = decide(
            observed, self._autoscaling(), self._decide_state, now
        )
        self._set_desired(decision.desired, decision.reason, observed)
        self.reconcile()

    def on_cold_start(self) -> None:
        """A request is held with no instance to take it: start one now unless one is coming."""
        if self._closing:
            return
        if self._count(_S.STARTING) or self._count(_S.READY):
            return
        self._hold_zero = False
        if self._cold_start_at is None:
            self._cold_start_at = self._clock()
        if self._desired < 1:
            self._decide_state = msgspec.structs.replace(self._decide_state, desired=1)
            self._set_desired(1, "cold start: a request is waiting with no instance")
        self.reconcile()

    def on_drained(self, instance_id: str) -> None:
        """The ingress has nothing in flight on this instance any more."""
        inst = self._instances.get(instance_id)
        if inst is not None and inst.state is _S.DRAINING:
            self._record("drained", f"{instance_id} drained", instance=instance_id)
            self._stop_instance(inst, Event.DRAINED)

    def on_runtime_event(self, event: RuntimeEvent) -> None:
        """An instance exited (or was removed) in the runtime: replace it if it was not asked."""
        inst = self._instances.get(event.instance_id)
        if inst is None or inst.state in (_S.STOPPING, _S.STOPPED, _S.FAILED):
            return
        was = inst.state
        self._health.unwatch(inst.id)
        self._cancel_drain_timer(inst)
        inst.state = transition(inst.state, Event.EXITED)
        code = "unknown" if event.exit_code is None else str(event.exit_code)
        reason = f"{inst.id} {event.kind} unasked (exit code {code}) while {was}"
        fields: dict[str, Any] = {"instance": inst.id, "exit_code": event.exit_code}
        if was is _S.STARTING and not inst.adopted:
            self._start_failed(reason, **fields)
        elif was is _S.READY:
            fields["from"] = was.value
            self._record("exited", f"{reason}: replacing it", level=logging.WARNING, **fields)
        else:
            fields["from"] = was.value
            self._record("exited", reason, **fields)
        if was in (_S.READY, _S.DRAINING):
            self._push()
        self._stop_instance(inst, Event.STOP)
        self.reconcile()

    def audit(self, found: Mapping[str, InstanceInfo], listed_at: float) -> None:
        """Compare with the runtime's list (taken at ``listed_at`` on the controller's clock):
        an instance the runtime no longer runs is handled as if its exit event had come. The
        event stream is the fast path; this catches an event lost while it was broken."""
        for inst in list(self._instances.values()):
            if not inst.launched or inst.created > listed_at:
                continue  # started after the list was taken: the list cannot know it
            if inst.state not in (_S.STARTING, _S.READY, _S.DRAINING):
                continue
            info = found.get(inst.id)
            if info is not None and info.state == "running":
                continue
            self._log.warning(
                "%s: %s is gone from the runtime without an event", self.name, inst.id
            )
            self.on_runtime_event(
                RuntimeEvent(
                    kind="removed" if info is None else "exited",
                    instance_id=inst.id,
                    service=self.name,
                    exit_code=None if info is None else info.exit_code,
                )
            )

    def reconcile(self) -> None:
        """Start or remove instances until the active ones (starting + ready) match desired;
        retire instances of another revision once the current ones are all ready."""
        if self._closing or not self._started:
            return
        active = [
            i
            for i in self._instances.values()
            if i.state in (_S.STARTING, _S.READY) and not i.outdated
        ]
        self._retire_outdated()
        missing = self._desired - len(active)
        if missing > 0:
            wait = self._retry_at - self._clock()
            if wait > 0:
                self._arm_retry(wait)
                return
            for _ in range(missing):
                self._launch()
        elif missing < 0:
            self._remove(active, -missing)

    def status(self) -> ServiceStatus:
        """What the controller is doing, for `tidegate status` and logs."""
        now = self._clock()
        counts = dict.fromkeys(InstanceState, 0)
        for inst in self._instances.values():
            counts[inst.state] += 1
        ready = self._count(_S.READY)
        starting = self._count(_S.STARTING)
        retry_in = max(0.0, self._retry_at - now)
        state: ServiceState
        if self._paused:
            state = "paused"
        elif self._failures and ready < self._desired:
            state = "failing"
        elif self._desired == 0 and not self._instances:
            state = "idle"
        elif ready == self._desired and len(self._instances) == ready:
            state = "running"
        else:
            state = "scaling"
        stats = self._last_stats
        scaling = self.spec.autoscaling
        return ServiceStatus(
            name=self.name,
            state=state,
            runtime=self.spec.runtime,
            revision=self._revision,
            domains=list(self.spec.domains),
            min_size=scaling.min_size,
            max_size=scaling.max_size,
            max_concurrency=scaling.max_concurrency,
            desired=self._desired,
            ready=ready,
            starting=starting,
            draining=counts[_S.DRAINING] + counts[_S.STOPPING],
            inflight=0 if stats is None else stats.inflight,
            queued=0 if stats is None else stats.queued,
            requests_per_second=self.usage.requests_per_second(),
            p99_seconds=self.usage.p99(),
            reason=self._last_reason,
            start_failures=self._failures,
            backoff_seconds=backoff_delay(self._failures),
            retry_in=retry_in,
            last_error=self._last_error,
            last_cold_start_seconds=self._last_cold_start,
            scale_events=dict(self._scale_events),
            active_instance_seconds=self.usage.active_seconds,
            idle_instance_seconds=self.usage.idle_seconds,
            recent_scale_events=[
                ScaleEvent(
                    ago_seconds=max(0.0, now - at),
                    direction=direction,  # type: ignore[arg-type]
                    from_desired=before,
                    to_desired=after,
                    reason=reason,
                )
                for at, direction, before, after, reason in self._recent_scales
            ],
            recent_cold_starts=[
                ColdStart(ago_seconds=max(0.0, now - at), seconds=took)
                for at, took in self._recent_cold_starts
            ],
            instances=[
                InstanceStatus(
                    id=i.id,
                    state=i.state.value,
                    address=i.address,
                    inflight=self._inflight.get(i.id, 0),
                    current=not i.outdated,
                    age_seconds=max(0.0, now - i.created),
                )
                for i in self._instances.values()
            ],
        )

    def instance_counts(self) -> dict[str, int]:
        """Instances by lifecycle state (every revision), for the metrics."""
        counts = dict.fromkeys((state.value for state in InstanceState), 0)
        for inst in self._instances.values():
            counts[inst.state.value] += 1
        return counts

    @property
    def desired(self) -> int:
        return self._desired

    @property
    def scale_events(self) -> dict[str, int]:
        return self._scale_events

    @property
    def paused(self) -> bool:
        return self._paused

    async def update(self, spec: ServiceSpec) -> ApplyAction:
        """Apply a changed file of this service: "replaced" when instances must be made anew
        (a new revision rolls out: new instances start, and the old ones are drained once
        those are ready), "updated" when only settings changed, "unchanged" otherwise."""
        if spec.name != self.name:
            raise ValueError(f"service {spec.name!r} given to the controller of {self.name!r}")
        if spec == self.spec:
            return "unchanged"
        revision = spec.spec_hash()
        replaced = revision != self._revision
        self.spec = spec
        if self._drain_timeout_given is None:
            self._drain_timeout = spec.request_timeout
        # domains, queue and timeouts take effect at once, for the instances already routed
        await self._control.put_service(routing_for(spec, self._routed_instances()))
        if replaced:
            old, self._revision = self._revision, revision
            self._failures = 0  # a new revision gets a fresh start, not the old one's back-off
            self._retry_at = 0.0
            self._last_error = None
            for inst in self._instances.values():
                if inst.state in (_S.STARTING, _S.READY):
                    inst.outdated = True
            change: dict[str, Any] = {"from": old, "to": revision}
            self._record("replaced", f"revision {revision} replaces {old}", **change)
        scaling = self._autoscaling()
        desired = min(max(self._desired, scaling.min_size), scaling.max_size)
        if replaced and desired == 0 and any(i.outdated for i in self._instances.values()):
            desired = 1  # serving instances are replaced one for one, not dropped
        if desired != self._desired:
            self._decide_state = msgspec.structs.replace(self._decide_state, desired=desired)
            self._set_desired(desired, "service file applied")
        self.reconcile()
        return "replaced" if replaced else "updated"

    def pause(self) -> None:
        """Stop every instance now (draining the ready ones); the next request cold-starts
        one again. Held at zero until a request comes or :meth:`resume`."""
        self._record("paused", "paused: every instance stops; the next request starts one")
        self._paused = True
        self._hold_zero = True
        self._cold_start_at = None
        self._decide_state = DecideState(desired=0)
        self._window = Window()  # the load before the pause must not start instances again
        self._set_desired(0, "paused")
        for inst in list(self._instances.values()):
            if not inst.outdated:
                continue
            if inst.state is _S.READY:
                self._drain(inst, "paused")
            elif inst.state is _S.STARTING:
                self._stop_instance(inst, Event.STOP)
        self._push()
        self.reconcile()

    def resume(self) -> None:
        """Back to min_size (and to decide()'s count as requests come)."""
        self._record("resumed", f"resumed: back to min_size {self.spec.autoscaling.min_size}")
        self._paused = False
        self._hold_zero = False
        minimum = self.spec.autoscaling.min_size
        if self._desired < minimum:
            self._decide_state = msgspec.structs.replace(self._decide_state, desired=minimum)
            self._set_desired(minimum, f"resumed: min_size {minimum}")
        self.reconcile()

    async def resync(self) -> None:
        """Put the service and its instances at the ingress again (it may have restarted)."""
        if not self._started or self._closing:
            return
        try:
            await self._control.put_service(routing_for(self.spec, self._routed_instances()))
        except ControlError as exc:
            self._log.warning("%s: putting the service at the ingress failed: %s", self.name, exc)

    async def flush(self) -> None:
        """Wait until the latest instance list has been sent to the ingress."""
        while self._pusher is not None and not self._pusher.done():
            await asyncio.shield(self._pusher)

    async def detach(self) -> None:
        """Stop managing the instances and leave them serving: a scaler shutting down whose
        successor adopts them (their labels say whose they are)."""
        self._closing = True
        self._detached = True
        self._leaving = True
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for inst in self._instances.values():
            self._cancel_drain_timer(inst)
            self._health.unwatch(inst.id)
        tasks = [*self._tasks, *self._collectors]
        if self._pusher is not None:
            tasks.append(self._pusher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def stop(self, *, drain: bool = True) -> None:
        """Stop every instance this controller started; with ``drain``, ready ones are drained
        at the ingress first (without, the caller has already drained the ingress)."""
        self._closing = True
        self._detached = not drain
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        for inst in list(self._instances.values()):
            if inst.state is _S.READY and drain:
                self._drain(inst, "shutting down")
            elif inst.state is not _S.STOPPING and (
                drain is False or inst.state is not _S.DRAINING
            ):
                self._stop_instance(inst, Event.STOP)
        if drain:
            self._push()
        if self._instances:
            self._gone.clear()
            limit = (self._drain_timeout if drain else 0.0) + self._stop_grace + 5.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(limit):
                    await self._gone.wait()
        for inst in list(self._instances.values()):  # past every deadline: remove what is left
            self._cancel_drain_timer(inst)
            self._health.unwatch(inst.id)
            with contextlib.suppress(LaunchError):
                await self._runtime.stop(inst.id, grace=0.0)
        self._instances.clear()
        if self._collectors:  # the stopped instances' last lines
            await asyncio.wait(set(self._collectors), timeout=OUTPUT_DRAIN)
        tasks = [*self._tasks, *self._collectors]
        if self._pusher is not None:
            tasks.append(self._pusher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- deciding what to change -----------------------------------------------------------

    def _autoscaling(self) -> AutoscalingSpec:
        """The service's autoscaling, with min_size 0 while paused."""
        scaling = self.spec.autoscaling
        if self._paused:
            return msgspec.structs.replace(scaling, min_size=0)
        return scaling

    def _count(self, state: InstanceState) -> int:
        """Instances of the current revision in ``state``."""
        return sum(1 for i in self._instances.values() if i.state is state and not i.outdated)

    def _set_desired(self, desired: int, reason: str, observed: Observed | None = None) -> None:
        """Change the desired count, recording why and the numbers that led there (decide()'s
        ``observed`` when it decided; else the counts at hand)."""
        if desired == self._desired:
            self._log.debug("%s: %s", self.name, reason)
            return
        direction = "up" if desired > self._desired else "down"
        self._scale_events[direction] += 1
        self._recent_scales.appendleft((self._clock(), direction, self._desired, desired, reason))
        numbers: dict[str, Any] = {
            "direction": direction,
            "desired_from": self._desired,
            "desired_to": desired,
            "reason": reason,
        }
        if observed is not None:
            numbers.update(
                stable_avg=observed.stable_avg,
                panic_avg=observed.panic_avg,
                current_demand=observed.current_demand,
                ready=observed.ready,
                starting=observed.starting,
            )
        else:
            numbers.update(
                current_demand=self._window.current_demand,
                ready=self._count(_S.READY),
                starting=self._count(_S.STARTING),
            )
        numbers["max_concurrency"] = self.spec.autoscaling.max_concurrency
        self._record(
            "scale", f"scale {direction} {self._desired} -> {desired}: {reason}", **numbers
        )
        self._desired = desired
        self._last_reason = reason

    def _record(
        self, event: str, message: str, *, level: int = logging.INFO, **fields: Any
    ) -> None:
        """One lifecycle point: the sentence in the text log (the journal), and the same
        sentence with ``fields`` as a record in the service's system log."""
        self._log.log(level, "%s: %s", self.name, message)
        if self._events is not None:
            self._events.system(self.name, event, message, **fields)

    def _remove(self, active: list[_Instance], count: int) -> None:
        """Remove ``count`` instances: starting ones first, then the least loaded, newest."""
        starting = sorted((i for i in active if i.state is _S.STARTING), key=lambda i: -i.created)
        ready = sorted(
            (i for i in active if i.state is _S.READY),
            key=lambda i: (self._inflight.get(i.id, 0), -i.created),
        )
        for inst in (starting + ready)[:count]:
            if inst.state is _S.STARTING:
                self._record(
                    "draining",
                    f"{inst.id} is not needed any more: stopping it",
                    instance=inst.id,
                    reason="not needed before it was ready",
                )
                self._stop_instance(inst, Event.STOP)
            else:
                self._drain(inst, f"scale down to {self._desired}")
        self._push()

    # -- adopting what an earlier scaler left ---------------------------------------------

    async def _adopt(self, routed: Mapping[str, InstanceSpec]) -> None:
        """Take over this service's running instances (those in ``routed`` as ready, the
        others health-gated like new ones); remove its exited ones."""
        try:
            found = await self._runtime.list()
        except LaunchError as exc:
            self._log.warning("%s: listing existing instances failed: %s", self.name, exc)
            return
        adopted = 0
        for info in found:
            if info.service != self.name or info.instance_id in self._instances:
                continue
            if info.state != "running" or info.address is None:
                self._record(
                    "exited",
                    f"removing {info.instance_id} left {info.state}",
                    instance=info.instance_id,
                    exit_code=info.exit_code,
                )
                try:
                    await self._runtime.stop(info.instance_id, grace=0.0)
                except LaunchError as exc:
                    self._log.warning(
                        "%s: removing %s failed: %s", self.name, info.instance_id, exc
                    )
                continue
            outdated = info.revision != self._revision
            at_ingress = routed.get(info.instance_id)
            serving = at_ingress is not None and at_ingress.address == info.address
            inst = _Instance(
                info.instance_id,
                _S.READY if serving else _S.STARTING,
                self._clock(),
                address=info.address,
                launched=True,
                adopted=True,
                outdated=outdated,
            )
            self._instances[inst.id] = inst
            adopted += 1
            self._record(
                "adopted",
                f"adopted {inst.id} at {info.address}"
                + (" (serving)" if serving else "")
                + (f" (revision {info.revision}: to be replaced)" if outdated else ""),
                instance=inst.id,
                address=info.address,
                serving=serving,
                revision=info.revision,
            )
            # its output from where the last scaler's collection stopped; a runtime that
            # cannot date lines continues from its own saved position
            cursor = None if self._events is None else self._events.cursor(self.name, inst.id)
            self._collect(inst.id, cursor if cursor is not None else info.started_at)
            self._health.watch(inst.id, info.address, self.spec.health_check, self._on_health)
        # the earlier scaler's count stands until decide() says otherwise
        scaling = self.spec.autoscaling
        desired = min(scaling.max_size, max(scaling.min_size, adopted))
        if desired != self._desired:
            self._decide_state = msgspec.structs.replace(self._decide_state, desired=desired)
            self._set_desired(desired, f"start: {adopted} running instance(s) adopted")

    def _retire_outdated(self) -> None:
        """Drain instances of another revision once the current ones are ready and enough."""
        outdated = [
            i for i in self._instances.values() if i.outdated and i.state in (_S.STARTING, _S.READY)
        ]
        if not outdated or self._count(_S.STARTING) or self._count(_S.READY) < self._desired:
            return
        for inst in outdated:
            if inst.state is _S.READY:
                self._drain(inst, "replaced by the current revision")
            else:
                self._record(
                    "replaced", f"{inst.id} is replaced before it was ready", instance=inst.id
                )
                self._stop_instance(inst, Event.STOP)
        self._push()

    # -- starting ----------------------------------------------------------------------------

    def _launch(self) -> None:
        instance_id = f"{self.name}-{secrets.token_hex(3)}"
        while instance_id in self._instances:
            instance_id = f"{self.name}-{secrets.token_hex(3)}"
        inst = _Instance(instance_id, _S.STARTING, self._clock())
        self._instances[instance_id] = inst
        self._record(
            "starting", f"starting {instance_id}", instance=instance_id, revision=self._revision
        )
        self._spawn(self._start_instance(inst), f"start {instance_id}")

    def _launch_spec(self, instance_id: str) -> LaunchSpec:
        spec = self.spec
        values = resolve_secrets(spec, self._environ)
        own_port = spec.runtime == "process" or spec.network.mode == "host"
        port = free_port() if own_port else spec.port
        env = dict(spec.env)
        env.update(values)
        env["PORT"] = str(port)
        env["TIDEGATE_SERVICE"] = spec.name
        env["TIDEGATE_INSTANCE"] = instance_id
        return LaunchSpec(
            service=spec.name,
            revision=self._revision,
            instance_id=instance_id,
            image=spec.image,
            command=spec.command or (),
            env=env,
            port=port,
            network_mode=spec.network.mode,
            networks=spec.network.networks,
            cpu=spec.instance.cpu,
            memory=spec.instance.memory,
            workdir=self._workdir,
            secret_names=tuple(values),
        )

    async def _start_instance(self, inst: _Instance) -> None:
        try:
            launch = self._launch_spec(inst.id)
            info = await self._runtime.start(launch)
        except (LaunchError, SpecError, OSError) as exc:
            if inst.state is _S.STARTING:
                self._start_failed(f"{inst.id} could not start: {exc}", instance=inst.id)
            self._forget(inst)
            self.reconcile()
            return
        inst.launched = True
        self._collect(inst.id, None)  # first: an app that dies at once says why there
        if inst.state is not _S.STARTING:  # removed, or shutting down, while it started
            self._spawn(self._stop_in_runtime(inst), f"stop {inst.id}")
            return
        if info.state != "running" or info.address is None:
            inst.state = transition(inst.state, Event.EXITED)
            why = info.error or f"exit code {info.exit_code}"
            self._start_failed(
                f"{inst.id} exited at once ({why})", instance=inst.id, exit_code=info.exit_code
            )
            self._stop_instance(inst, Event.STOP)
            self.reconcile()
            return
        inst.address = info.address
        self._record(
            "started",
            f"started {inst.id} at {info.address}",
            instance=inst.id,
            address=info.address,
            took_seconds=self._clock() - inst.created,
        )
        self._health.watch(inst.id, info.address, self.spec.health_check, self._on_health)

    def _start_failed(self, reason: str, **fields: Any) -> None:
        self._failures += 1
        delay = backoff_delay(self._failures)
        self._retry_at = self._clock() + delay
        self._last_error = reason
        self._record(
            "start_failed",
            f"{reason} ({self._failures} failed start(s) in a row: next start in {delay:g}s)",
            level=logging.WARNING,
            **fields,
            reason=reason,
            failures=self._failures,
            backoff_seconds=delay,
        )

    def _arm_retry(self, wait: float) -> None:
        if self._retry_timer is not None:
            return
        self._record(
            "backoff",
            f"waiting {wait:.1f}s before the next start ({self._failures} failed in a row)",
            seconds=wait,
            failures=self._failures,
        )
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._retry_timer = None
            self.reconcile()

        self._retry_timer = loop.call_later(wait, fire)

    def _on_health(self, instance_id: str, change: HealthChange, detail: str) -> None:
        inst = self._instances.get(instance_id)
        if inst is None:
            return
        if change is HealthChange.HEALTHY:
            if inst.state is not _S.STARTING:
                return
            inst.state = transition(inst.state, change.event)
            if not inst.adopted:  # only a start of ours ends the back-off
                self._failures = 0
                self._retry_at = 0.0
            took = self._clock() - inst.created
            cold: dict[str, Any] = {}
            if self._cold_start_at is not None:
                self._last_cold_start = self._clock() - self._cold_start_at
                self.cold_starts.observe(self._last_cold_start)
                self._recent_cold_starts.appendleft((self._clock(), self._last_cold_start))
                self._cold_start_at = None
                cold["cold_start_seconds"] = self._last_cold_start
            self._record(
                "ready",
                f"{inst.id} is ready ({took:.3f}s after start)",
                instance=inst.id,
                took_seconds=took,
                **cold,
            )
            self._push()
            self.reconcile()  # the desired count may have dropped meanwhile
        elif change is HealthChange.UNHEALTHY:
            if inst.state is not _S.READY:
                return
            self._record(
                "unhealthy",
                f"{inst.id} is unhealthy ({detail}): replacing it",
                level=logging.WARNING,
                instance=inst.id,
                reason=detail,
            )
            self._health.unwatch(inst.id)
            self._drain(inst, "unhealthy", Event.UNHEALTHY)
            self._push()
            self.reconcile()
        elif change is HealthChange.START_TIMEOUT:
            if inst.state is not _S.STARTING:
                return
            inst.state = transition(inst.state, change.event)
            reason = f"{inst.id} was not healthy in time ({detail})"
            if inst.adopted:  # not a start of ours: no back-off
                self._record(
                    "unhealthy",
                    f"{reason}: replacing it",
                    level=logging.WARNING,
                    instance=inst.id,
                    reason=detail,
                )
            else:
                self._start_failed(reason, instance=inst.id)
            self._stop_instance(inst, Event.STOP)
            self.reconcile()

    # -- draining and stopping -------------------------------------------------------------

    def _drain(self, inst: _Instance, why: str, event: Event = Event.DRAIN) -> None:
        inst.state = transition(inst.state, event)
        self._record("draining", f"draining {inst.id} ({why})", instance=inst.id, reason=why)
        loop = asyncio.get_running_loop()
        inst.drain_timer = loop.call_later(self._drain_timeout, self._on_drain_timeout, inst)

    def _on_drain_timeout(self, inst: _Instance) -> None:
        inst.drain_timer = None
        if inst.state is _S.DRAINING:
            self._record(
                "drained",
                f"{inst.id} still busy after {self._drain_timeout:g}s of draining: stopping it",
                level=logging.WARNING,
                instance=inst.id,
                reason="drain timeout",
            )
            self._stop_instance(inst, Event.DRAIN_TIMEOUT)

    def _cancel_drain_timer(self, inst: _Instance) -> None:
        if inst.drain_timer is not None:
            inst.drain_timer.cancel()
            inst.drain_timer = None

    def _stop_instance(self, inst: _Instance, event: Event) -> None:
        """Move the instance to stopping; stop it in the runtime once the runtime has it."""
        was = inst.state
        inst.state = transition(inst.state, event)
        self._cancel_drain_timer(inst)
        self._health.unwatch(inst.id)
        if was in (_S.READY, _S.DRAINING):
            self._push()
        if inst.launched and was is not _S.STOPPING:
            self._spawn(self._stop_in_runtime(inst), f"stop {inst.id}")
        # not launched yet: _start_instance stops it when the runtime returns

    async def _stop_in_runtime(self, inst: _Instance) -> None:
        try:
            await self._runtime.stop(inst.id, grace=self._stop_grace)
        except LaunchError as exc:
            self._record(
                "stopped",
                f"stopping {inst.id} failed: {exc}",
                level=logging.WARNING,
                instance=inst.id,
                error=str(exc),
            )
        else:
            self._record("stopped", f"stopped {inst.id}", instance=inst.id)
        if inst.state is _S.STOPPING:
            inst.state = transition(inst.state, Event.EXITED)
        self._forget(inst)
        self.reconcile()

    def _forget(self, inst: _Instance) -> None:
        if self._instances.get(inst.id) is inst:
            del self._instances[inst.id]
        if not self._instances:
            self._gone.set()

    # -- talking to the ingress ------------------------------------------------------------

    def _push(self) -> None:
        """Send the current instance list soon; one push at a time, always the latest."""
        if self._detached:
            return
        self._push_dirty = True
        if self._pusher is None or self._pusher.done():
            self._pusher = asyncio.get_running_loop().create_task(
                self._push_loop(), name=f"push {self.name}"
            )

    async def _push_loop(self) -> None:
        while self._push_dirty:
            self._push_dirty = False
            instances = self._routed_instances()
            try:
                await self._control.put_instances(self.name, instances)
            except ControlError as exc:
                if exc.status == 404:  # the ingress lost the service (restarted): put it again
                    with contextlib.suppress(ControlError):
                        await self._control.put_service(routing_for(self.spec, instances))
                        continue
                self._log.warning(
                    "%s: telling the ingress the instances failed: %s", self.name, exc
                )

    def _routed_instances(self) -> list[InstanceSpec]:
        """The instances the ingress should know: ready ones, and draining ones to finish."""
        return [
            InstanceSpec(
                id=i.id, address=i.address, state="ready" if i.state is _S.READY else "draining"
            )
            for i in self._instances.values()
            if i.state in (_S.READY, _S.DRAINING) and i.address is not None
        ]

    # -- the instances' output ----------------------------------------------------------------

    def _collect(self, instance_id: str, since: float | None) -> None:
        """Copy the instance's output into the service's app log until it ends."""
        if self._events is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._collect_output(self._events, instance_id, since), name=f"output {instance_id}"
        )
        self._collectors.add(task)
        task.add_done_callback(self._collector_done)

    async def _collect_output(
        self, events: ServiceLogs, instance_id: str, since: float | None
    ) -> None:
        try:
            async for line in self._runtime.logs(instance_id, since):
                events.app(self.name, instance_id, line.stream, line.line, line.time)
        except LaunchError as exc:
            self._log.warning(
                "%s: collecting the output of %s failed: %s", self.name, instance_id, exc
            )
            return
        if not self._leaving:  # it has ended: no successor continues it
            events.forget(self.name, instance_id)

    def _collector_done(self, task: asyncio.Task[None]) -> None:
        self._collectors.discard(task)
        self._task_done(task)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("%s: %s failed", self.name, task.get_name(), exc_info=task.exception())


# -- feeding controllers --------------------------------------------------------------------


async def dispatch_control_events(
    control: ControlClient,
    controllers: Mapping[str, ServiceController],
    *,
    stats: bool = True,
    resubscribe_delay: float = _RESUBSCRIBE_DELAY,
    closing: asyncio.Event | None = None,
) -> None:
    """Subscribe to the ingress and hand each event to its service's controller, until
    cancelled; a subscription the ingress ends is taken up again. ``stats=False`` drops the
    stats stream (tests that feed :meth:`ServiceController.on_stats` themselves). Once
    ``closing`` is set, the ingress ending the subscription ends this quietly.

    After a break every controller puts its service again (:meth:`ServiceController.resync`):
    a restarted ingress knows nothing, and a service at zero instances would otherwise not be
    routed (404) until it next changed."""
    resubscribed = False
    delay = 0.0
    while True:
        try:
            async for event in control.subscribe():
                if resubscribed:
                    resubscribed = False
                    for each in list(controllers.values()):
                        await each.resync()
                if isinstance(event, StatsEvent):
                    if not stats:
                        continue
                    now = event.snapshot.time
                    for service in event.snapshot.services:
                        controller = controllers.get(service.name)
                        if controller is not None:
                            controller.on_stats(service, now)
                elif isinstance(event, ColdStartEvent):
                    controller = controllers.get(event.service)
                    if controller is not None:
                        controller.on_cold_start()
                elif isinstance(event, DrainedEvent):
                    controller = controllers.get(event.service)
                    if controller is not None:
                        controller.on_drained(event.instance)
            return  # the client was closed
        except ControlError as exc:
            if closing is not None and closing.is_set():
                return
            if not resubscribed:
                _log.warning("control subscription ended: %s; subscribing again", exc)
        if resubscribed:
            delay = min(resubscribe_delay, delay * 2)
        else:
            delay = min(resubscribe_delay, _RESUBSCRIBE_FIRST)
        resubscribed = True
        await asyncio.sleep(delay)


async def dispatch_runtime_events(
    runtime: Runtime, controllers: Mapping[str, ServiceController]
) -> None:
    """Hand the runtime's exits and removals to their service's controller, until it closes."""
    async for event in runtime.events():
        controller = controllers.get(event.service)
        if controller is not None:
            controller.on_runtime_event(event)


async def remove_orphans(
    runtime: Runtime, known_services: set[str], log: logging.Logger
) -> list[str]:
    """Stop every instance in ``runtime`` whose service has no file any more; returns their
    ids. Run before the controllers start, so a service removed while the scaler was down
    leaves nothing behind."""
    try:
        found = await runtime.list()
    except LaunchError as exc:
        log.warning("listing instances to find orphans failed: %s", exc)
        return []
    removed = []
    for info in found:
        if info.service in known_services:
            continue
        log.info("removing %s: its service %s has no file any more", info.instance_id, info.service)
        try:
            await runtime.stop(info.instance_id, grace=STOP_GRACE)
        except LaunchError as exc:
            log.warning("removing %s failed: %s", info.instance_id, exc)
            continue
        removed.append(info.instance_id)
    return removed


async def audit_runtime(
    runtime: Runtime,
    controllers: Mapping[str, ServiceController],
    *,
    interval: float = AUDIT_INTERVAL,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Every ``interval`` seconds, list the runtime's instances and let each controller
    compare (:meth:`ServiceController.audit`), until cancelled."""
    while True:
        await asyncio.sleep(interval)
        listed_at = clock()
        try:
            found = await runtime.list()
        except LaunchError as exc:
            _log.warning("listing instances for the periodic check failed: %s", exc)
            continue
        by_id = {info.instance_id: info for info in found}
        for controller in list(controllers.values()):
            if controller._runtime is runtime:  # another runtime's services are not in its list
                controller.audit(by_id, listed_at)
