"""Messages of the scaler's control API (`tidegate status`, `apply`, `pause`, `resume`).

Served by :mod:`scaler.api` on the scaler's own unix socket (mode 0600), JSON encoded with
msgspec like the ingress's API (:mod:`ingress.messages`). Durations are float seconds.

- ``GET    /v1/status``                    -> :class:`StatusReport` (``?service=NAME``: one)
- ``POST   /v1/apply``                     body :class:`ApplyRequest` -> :class:`ApplyResponse`
- ``POST   /v1/services/{name}/pause``     -> :class:`ServiceStatus`
- ``POST   /v1/services/{name}/resume``    -> :class:`ServiceStatus`
- ``DELETE /v1/services/{name}``           -> 204: drain and stop its instances, forget it

Errors are ``{"error": "..."}`` with 400 (a bad file or body: nothing was changed), 404
(unknown service) or 409.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = [
    "ApplyAction",
    "ApplyFile",
    "ApplyRequest",
    "ApplyResponse",
    "ApplyResult",
    "ColdStart",
    "FileError",
    "InstanceStatus",
    "ScaleEvent",
    "ServiceState",
    "ServiceStatus",
    "StatusReport",
]

# running: what desired asks for is ready; scaling: instances are starting or draining;
# idle: at zero, waiting for a request; paused: stopped by `tidegate pause`;
# failing: the last start failed and the next one waits out a back-off
ServiceState = Literal["running", "scaling", "idle", "paused", "failing"]


class InstanceStatus(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    state: str  # starting ready draining stopping (scaler.lifecycle.InstanceState)
    address: str | None
    inflight: int  # requests the ingress has on it right now
    current: bool  # of the service's current revision (False: being replaced)
    age_seconds: float  # since its start was asked for (or it was adopted)


class ScaleEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A change of the desired count."""

    ago_seconds: float
    direction: Literal["up", "down"]
    from_desired: int
    to_desired: int
    reason: str  # decide()'s reason, with its numbers


class ColdStart(msgspec.Struct, frozen=True, kw_only=True):
    ago_seconds: float
    seconds: float  # a request held at zero to the first instance ready


class ServiceStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    state: ServiceState
    runtime: str
    revision: str  # the spec hash instances of the current revision carry
    domains: list[str]
    min_size: int
    max_size: int
    max_concurrency: int
    desired: int
    ready: int
    starting: int
    draining: int  # draining or stopping
    inflight: int
    queued: int
    requests_per_second: float  # over the last 10 s
    p99_seconds: float | None  # request duration over the last 10 s; None without requests
    reason: str  # why desired is what it is
    start_failures: int  # failed starts in a row
    backoff_seconds: float  # the wait the failures in a row have earned
    retry_in: float  # seconds until the next start is allowed (back-off)
    last_error: str | None
    last_cold_start_seconds: float | None
    scale_events: dict[str, int]  # direction ("up", "down") -> count
    active_instance_seconds: float
    idle_instance_seconds: float
    recent_scale_events: list[ScaleEvent] = []  # newest first, the last 10
    recent_cold_starts: list[ColdStart] = []  # newest first, the last 10
    instances: list[InstanceStatus] = []


class FileError(msgspec.Struct, frozen=True):
    """A service file the scaler could not load (the others run)."""

    file: str
    error: str


class StatusReport(msgspec.Struct, frozen=True):
    services: list[ServiceStatus]
    errors: list[FileError] = []


class ApplyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One service file: its absolute path (relative paths in it are resolved from its
    directory) and its text, read by the client."""

    path: str
    text: str


class ApplyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    files: list[ApplyFile]


# created: new service; replaced: a new revision is rolling out; updated: settings applied
# in place (scaling, domains, timeouts, health check); unchanged
ApplyAction = Literal["created", "replaced", "updated", "unchanged"]


class ApplyResult(msgspec.Struct, frozen=True):
    service: str
    action: ApplyAction
    revision: str


class ApplyResponse(msgspec.Struct, frozen=True):
    results: list[ApplyResult]
