"""Services as the ingress sees them, and the Host -> service lookup.

The router owns one :class:`Service` per service the scaler (or static mode) put: its routing
settings, its :class:`~ingress.balancer.ServiceBalancer`, one pool of idle upstream connections
per instance and plain-integer counters read by the control API and metrics. It implements the
control API's :class:`~ingress.control.ControlTarget`, so applying a routing is synchronous and
never awaits: a request sees the old routing or the new one, never half of each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, cast

import msgspec

from ingress.balancer import HeldRequest, Instance, ServiceBalancer
from ingress.histogram import Histogram
from ingress.messages import (
    ColdStartEvent,
    DrainedEvent,
    Event,
    InstanceSpec,
    InstanceStats,
    ServiceRouting,
    ServiceStats,
    StatsSnapshot,
    parse_address,
)
from ingress.upstream import UpstreamPool

# Seconds an instance that failed a request before answering stays out of the rotation: long
# enough for the scaler to learn of a dead instance (its exit event, then an update, takes
# milliseconds), short enough that a hiccup costs little capacity.
EJECT_SECONDS = 1.0

if TYPE_CHECKING:
    from ingress.timers import TimerWheel


class HeldClient(Protocol):
    """What a held request must do when the queue gives up on it (see ingress.proxy)."""

    def grant(self, instance: Instance) -> None: ...
    def queue_expired(self) -> None: ...


class Service:
    """One service's routing, balancer, upstream pools and counters."""

    __slots__ = (
        "_router",
        "balancer",
        "codes",
        "connect_timeout",
        "duration",
        "errors",
        "max_body",
        "name",
        "pools",
        "queue_wait",
        "request_timeout",
        "retry_after",
        "routing",
        "wheel_slot",
    )

    def __init__(self, router: Router, routing: ServiceRouting) -> None:
        self._router = router
        self.name = routing.name
        self.wheel_slot = -1
        self.pools: dict[Instance, UpstreamPool] = {}
        # responses by class: index 1 = 1xx ... 5 = 5xx (index 0 unused), bumped per request
        self.codes = [0, 0, 0, 0, 0, 0]
        self.errors: dict[str, int] = {}  # upstream errors by kind: connect, reset, timeout...
        self.duration = Histogram()  # arrival to the end of the response (or tunnel)
        self.queue_wait = Histogram()  # arrival to a slot on an instance (0 if none was needed)
        self.balancer = ServiceBalancer(
            routing.name,
            max_concurrency=routing.max_concurrency,
            queue_max_length=routing.queue_max_length,
            queue_timeout=routing.queue_timeout,
            on_drained=self._on_drained,
        )
        self._apply(routing)

    def _apply(self, routing: ServiceRouting) -> None:
        self.routing = routing
        self.request_timeout = routing.request_timeout
        self.connect_timeout = routing.connect_timeout
        self.max_body = routing.max_body_bytes
        # Retry-After for a 503: the queue timeout is how long a client would have waited
        self.retry_after = max(1, round(routing.queue_timeout))

    def update(self, routing: ServiceRouting) -> None:
        self._apply(routing)
        self.balancer.update_limits(
            max_concurrency=routing.max_concurrency,
            queue_max_length=routing.queue_max_length,
            queue_timeout=routing.queue_timeout,
        )

    def set_instances(self, instances: list[InstanceSpec]) -> None:
        parsed = [(spec.id, parse_address(spec.address), spec.state) for spec in instances]
        self.balancer.set_instances(parsed)

    def pool_for(self, instance: Instance) -> UpstreamPool:
        """The instance's idle-connection pool, made on first use (a new instance may be
        granted to a held request from inside set_instances)."""
        pool = self.pools.get(instance)
        if pool is None:
            pool = self.pools[instance] = UpstreamPool(
                instance.address, max_idle=self._router.max_idle_per_instance
            )
        return pool

    def eject(self, instance: Instance, now: float) -> None:
        """The instance failed a request before answering (refused, reset): out of the
        rotation for EJECT_SECONDS, and its idle connections, likely dead too, closed."""
        if self.balancer.eject(instance, now + EJECT_SECONDS):
            pool = self.pools.pop(instance, None)
            if pool is not None:
                pool.close()  # connections out on requests are closed when they come back
            self._schedule()

    def _schedule(self) -> None:
        deadline = self.balancer.next_deadline()
        if deadline is not None:
            self._router.wheel.schedule(self, deadline)

    def hold(self, client: HeldClient, now: float) -> HeldRequest | None:
        """Hold a request that no instance can take now; None when the queue is full.

        The caller keeps the token to cancel it when its client goes away.
        """
        balancer = self.balancer
        held = balancer.hold(client, now)
        if held is not None and balancer.queued == 1:
            # First held request of a burst: the cold-start signal, and the queue's timer.
            self._router.emit(ColdStartEvent(service=self.name, queued=1, time=now))
            self._schedule()
        return held

    def on_deadline(self, now: float) -> None:
        """The oldest held request may have timed out: answer 503 for every expired one."""
        for waiter in self.balancer.expire(now):
            cast(HeldClient, waiter).queue_expired()
        self._schedule()

    def _on_drained(self, instance: Instance) -> None:
        pool = self.pools.get(instance)
        if pool is not None and instance.state == "removed":
            del self.pools[instance]
            pool.close()
        self._router.emit(
            DrainedEvent(service=self.name, instance=instance.id, time=self._router.now())
        )

    def close(self) -> None:
        """The service was deleted: held requests get 503, idle connections are closed."""
        self._router.wheel.cancel(self)
        for waiter in self.balancer.close():
            cast(HeldClient, waiter).queue_expired()
        for pool in self.pools.values():
            pool.close()

    def stats(self) -> ServiceStats:
        balancer = self.balancer
        return ServiceStats(
            name=self.name,
            inflight=balancer.inflight,
            queued=balancer.queued,
            arrivals=balancer.arrivals,
            completions=balancer.completions,
            instances=[
                InstanceStats(id=i.id, state=i.state, inflight=i.inflight)
                for i in balancer.instances()
            ],
            durations=list(self.duration.counts),
        )


class Router:
    """Host -> service, and the control API's target."""

    def __init__(
        self,
        wheel: TimerWheel,
        now: Callable[[], float],
        *,
        max_idle_per_instance: int = 128,
    ) -> None:
        self.wheel = wheel
        self.now = now
        self.max_idle_per_instance = max_idle_per_instance
        self._services: dict[str, Service] = {}
        self._by_host: dict[bytes, Service] = {}
        self._default: Service | None = None
        self._listeners: list[Callable[[Event], None]] = []
        # called after each change of the table through the control API (the route store)
        self.on_change: Callable[[list[ServiceRouting]], None] | None = None
        # responses to requests no service matched (404s, malformed requests), by class
        self.unrouted = [0, 0, 0, 0, 0, 0]

    # -- the hot path --------------------------------------------------------------------

    def route(self, host: bytes) -> Service | None:
        """The service for a Host header value (already lowercased), else the default."""
        service = self._by_host.get(host)
        if service is not None:
            return service
        if host:
            # strip a port: "name:8080" or "[::1]:8080"
            end = host.rfind(b":")
            if end > 0 and host.rfind(b"]") < end:
                service = self._by_host.get(host[:end])
                if service is not None:
                    return service
        return self._default

    # -- ControlTarget -------------------------------------------------------------------

    def put_service(self, routing: ServiceRouting) -> ServiceStats:
        _validate(routing)
        for domain in routing.domains:
            owner = self._by_host.get(domain.encode())
            if owner is not None and owner.name != routing.name:
                raise ValueError(f"domain {domain!r} already belongs to service {owner.name!r}")
        if routing.default and self._default is not None and self._default.name != routing.name:
            raise ValueError(f"service {self._default.name!r} is already the default route")
        service = self._services.get(routing.name)
        if service is None:
            service = self._services[routing.name] = Service(self, routing)
        else:
            service.update(routing)
        self._reindex()
        service.set_instances(list(routing.instances))
        self._changed()
        return service.stats()

    def put_instances(self, name: str, instances: list[InstanceSpec]) -> ServiceStats:
        service = self._services[name]  # KeyError -> 404
        _validate_instances(instances)
        service.set_instances(instances)
        service.routing = _with_instances(service.routing, instances)
        self._changed()
        return service.stats()

    def delete_service(self, name: str) -> None:
        service = self._services.pop(name)  # KeyError -> 404
        self._reindex()
        service.close()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.services())

    def services(self) -> list[ServiceRouting]:
        return [s.routing for s in self._services.values()]

    def service(self, name: str) -> Service | None:
        return self._services.get(name)

    def all_services(self) -> list[Service]:
        return list(self._services.values())

    def snapshot(self) -> StatsSnapshot:
        return StatsSnapshot(time=self.now(), services=[s.stats() for s in self._services.values()])

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def emit(self, event: Event) -> None:
        for listener in self._listeners:
            listener(event)

    def close(self) -> None:
        for name in list(self._services):
            self.delete_service(name)

    def _reindex(self) -> None:
        by_host: dict[bytes, Service] = {}
        default: Service | None = None
        for service in self._services.values():
            for domain in service.routing.domains:
                by_host[domain.encode()] = service
            if service.routing.default:
                default = service
        self._by_host = by_host
        self._default = default


def _with_instances(routing: ServiceRouting, instances: list[InstanceSpec]) -> ServiceRouting:
    return msgspec.structs.replace(routing, instances=list(instances))


def _validate(routing: ServiceRouting) -> None:
    """Reject routings the proxy cannot honour; messages name the field."""
    if not routing.name:
        raise ValueError("name: must not be empty")
    if routing.max_concurrency is not None and routing.max_concurrency < 1:
        raise ValueError(f"max_concurrency: must be >= 1 (got {routing.max_concurrency})")
    if routing.queue_max_length < 0:
        raise ValueError(f"queue_max_length: must be >= 0 (got {routing.queue_max_length})")
    for field in ("queue_timeout", "request_timeout", "connect_timeout"):
        value = getattr(routing, field)
        if not value > 0:
            raise ValueError(f"{field}: must be > 0 seconds (got {value})")
    if routing.max_body_bytes is not None and routing.max_body_bytes < 0:
        raise ValueError(f"max_body_bytes: must be >= 0 (got {routing.max_body_bytes})")
    for i, domain in enumerate(routing.domains):
        if not domain or domain != domain.lower() or ":" in domain or " " in domain:
            raise ValueError(f"domains[{i}]: must be a lowercase host name without port")
    _validate_instances(routing.instances)


def _validate_instances(instances: list[InstanceSpec]) -> None:
    seen: set[str] = set()
    for i, spec in enumerate(instances):
        if spec.id in seen:
            raise ValueError(f"instances[{i}].id: duplicate id {spec.id!r}")
        seen.add(spec.id)
        try:
            parse_address(spec.address)
        except ValueError as exc:
            raise ValueError(f"instances[{i}].address: {exc}") from None
