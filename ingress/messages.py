"""Messages of the ingress's control API, shared with the scaler.

The scaler imports these types; the ingress never imports the scaler. Every message is a
msgspec Struct encoded as JSON. Durations are float seconds, sizes are int bytes: the service
file's strings ("5s", "1GB") are parsed by the scaler, not here.

Endpoints (served by :mod:`ingress.control` on a unix socket, mode 0600):

- ``PUT    /v1/services/{name}``            body :class:`ServiceRouting` -> :class:`ServiceStats`
- ``PUT    /v1/services/{name}/instances``  body ``list[InstanceSpec]`` -> :class:`ServiceStats`
- ``DELETE /v1/services/{name}``            -> 204 (held requests get 503)
- ``GET    /v1/services``                   -> ``list[ServiceRouting]``
- ``GET    /v1/stats``                      -> :class:`StatsSnapshot`
- ``GET    /v1/subscribe``                  WebSocket: a stream of :data:`Event` (text frames)

Errors are ``{"error": "..."}`` with 400 (bad body), 404 (unknown service) or 409.
"""

from __future__ import annotations

from typing import Literal

import msgspec

InstanceState = Literal["ready", "draining"]


class InstanceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One instance the ingress may send requests to.

    ``ready`` instances take new requests; ``draining`` ones finish what they have and get
    nothing new (the ingress reports them in stats until their in-flight count is zero).
    An instance missing from a later list is removed at once: its in-flight requests finish,
    but nothing new is sent.
    """

    id: str
    address: str  # "host:port", IPv6 as "[::1]:port"
    state: InstanceState = "ready"


class ServiceRouting(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything the ingress needs to route and hold requests for one service."""

    name: str
    domains: list[str] = []  # Host names, lowercase, no port; empty + default=True: catch-all
    default: bool = False  # receives requests whose Host matches no other service
    max_concurrency: int | None = 100  # in-flight requests per instance; None = unlimited
    queue_max_length: int = 1000  # held requests at most; past it: 503
    queue_timeout: float = 30.0  # seconds a request may be held before a 503
    request_timeout: float = 120.0  # seconds for the whole request before a 504
    connect_timeout: float = 5.0  # seconds to open a connection to an instance
    max_body_bytes: int | None = None  # request body limit (413); None = unlimited
    instances: list[InstanceSpec] = []


class InstanceStats(msgspec.Struct, frozen=True):
    id: str
    state: str  # "ready" | "draining" | "removed" (removed: still finishing requests)
    inflight: int


class ServiceStats(msgspec.Struct, frozen=True):
    """Counters are cumulative since the service was created: the scaler takes differences."""

    name: str
    inflight: int  # sum over instances, tunnels included
    queued: int  # requests held right now
    arrivals: int  # requests received for this service
    completions: int  # requests finished (any status)
    instances: list[InstanceStats] = []
    # cumulative counts of request durations per bucket of ingress.histogram.BOUNDS, +Inf last:
    # the scaler takes differences for the recent p99 that `tidegate status` shows
    durations: list[int] = []


class StatsSnapshot(msgspec.Struct, frozen=True):
    time: float  # the ingress's monotonic clock, seconds
    services: list[ServiceStats] = []


class StatsEvent(msgspec.Struct, frozen=True, tag="stats"):
    """Sent on every subscription at least every 100 ms."""

    snapshot: StatsSnapshot


class ColdStartEvent(msgspec.Struct, frozen=True, tag="cold_start"):
    """A request arrived for a service with no instance able to take it; sent at once."""

    service: str
    queued: int  # held requests for the service, this one included
    time: float  # the ingress's monotonic clock, seconds


class DrainedEvent(msgspec.Struct, frozen=True, tag="drained"):
    """A draining (or removed) instance's in-flight count reached zero."""

    service: str
    instance: str
    time: float


Event = StatsEvent | ColdStartEvent | DrainedEvent


class ErrorBody(msgspec.Struct, frozen=True):
    error: str


def parse_address(address: str, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into (host, port); ValueError if malformed.

    Port 0 ("any free port") is only meaningful for a listener, so it is opt-in.
    """
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"unbalanced brackets in address {address!r}")
        host = host[1:-1]
    port = int(port_text)
    if not (0 if allow_port_zero else 1) <= port < 65536:
        raise ValueError(f"port out of range in address {address!r}")
    return host, port
