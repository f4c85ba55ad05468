"""An instance's life, as data: its states, the events that move it, and the table between them.

The scaler keeps one :class:`InstanceState` per instance and moves it only through
:func:`transition`, which looks the pair up in :data:`TRANSITIONS`; a pair that is not in the
table raises :class:`IllegalTransition`. The table is the whole truth, as in h11's
``_state.py``: the docs print it with :func:`render_transitions` rather than drawing their
own, so the two cannot drift apart.

The states:

- ``STARTING``: the runtime has started it and it is not healthy yet. The ingress does not
  route to it; requests that arrive meanwhile wait in the queue.
- ``READY``: it passed its health check. The ingress routes requests to it.
- ``DRAINING``: on its way out (scaled down, or failing its health check after having been
  ready). The ingress sends it no new requests; the ones in flight are left to finish, until
  the ingress reports it drained or the drain time runs out.
- ``STOPPING``: the runtime is stopping it. The ingress no longer knows it.
- ``STOPPED``: it has exited after being asked to. The end; the scaler forgets it.
- ``FAILED``: it will never serve: it did not become healthy within the start deadline, or
  exited without being asked to. The scaler starts a replacement, then stops what is left of
  this one (``STOP``), so its container is removed.

The events come from three places: the health checker (``LISTENING_HEALTHY``, ``UNHEALTHY``,
and ``START_FAILED`` when the start deadline passes), the scaler's own decisions (``DRAIN``,
``STOP``) and the ingress (``DRAINED``) with the drain timer (``DRAIN_TIMEOUT``), and the
runtime (``EXITED``, and ``START_FAILED`` when it cannot start the instance at all).

A few pairs map a state to itself: they are events that can race with the one that moved
the instance (a health check already in flight when draining began, a second stop), and
ignoring them is right. Anything else out of place is a bug in the caller, and raises.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "TRANSITIONS",
    "Event",
    "IllegalTransition",
    "InstanceState",
    "render_transitions",
    "transition",
]


class InstanceState(enum.StrEnum):
    """Where an instance is in its life; the value is the label used in status and metrics."""

    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class Event(enum.StrEnum):
    """Something that happened to an instance."""

    LISTENING_HEALTHY = "listening_healthy"  # passed healthy_threshold checks in a row
    UNHEALTHY = "unhealthy"  # failed unhealthy_threshold checks in a row after being healthy
    DRAIN = "drain"  # the scaler takes it out of rotation (scale down, replacement)
    DRAINED = "drained"  # the ingress has no request in flight on it any more
    DRAIN_TIMEOUT = "drain_timeout"  # the drain time ran out with requests still in flight
    STOP = "stop"  # the scaler asks the runtime to stop it (or remove what is left of it)
    EXITED = "exited"  # the runtime saw it exit
    START_FAILED = "start_failed"  # never became healthy in time, or could not be started


_S = InstanceState
_E = Event

TRANSITIONS: Mapping[tuple[InstanceState, Event], InstanceState] = MappingProxyType(
    {
        (_S.STARTING, _E.LISTENING_HEALTHY): _S.READY,
        (_S.STARTING, _E.START_FAILED): _S.FAILED,
        (_S.STARTING, _E.EXITED): _S.FAILED,
        (_S.STARTING, _E.STOP): _S.STOPPING,  # nothing in flight: no drain needed
        (_S.READY, _E.DRAIN): _S.DRAINING,
        (_S.READY, _E.UNHEALTHY): _S.DRAINING,  # let what is in flight finish, then replace
        (_S.READY, _E.STOP): _S.STOPPING,  # pause, or shutdown: stop now without draining
        (_S.READY, _E.EXITED): _S.FAILED,
        (_S.DRAINING, _E.DRAINED): _S.STOPPING,
        (_S.DRAINING, _E.DRAIN_TIMEOUT): _S.STOPPING,
        (_S.DRAINING, _E.STOP): _S.STOPPING,
        (_S.DRAINING, _E.EXITED): _S.FAILED,
        (_S.DRAINING, _E.UNHEALTHY): _S.DRAINING,  # a check in flight when draining began
        (_S.STOPPING, _E.EXITED): _S.STOPPED,
        (_S.STOPPING, _E.STOP): _S.STOPPING,  # stopping is idempotent, as `docker stop` is
        (_S.FAILED, _E.STOP): _S.STOPPING,  # remove what is left (a container still running)
        (_S.FAILED, _E.EXITED): _S.FAILED,  # a start that timed out, then exited by itself
    }
)


class IllegalTransition(Exception):
    """An event that cannot happen to an instance in its current state: a bug in the caller."""

    def __init__(self, state: InstanceState, event: Event) -> None:
        self.state = state
        self.event = event
        super().__init__(f"illegal transition: event {event.name} in state {state.name}")


def transition(state: InstanceState, event: Event) -> InstanceState:
    """The state an instance in ``state`` moves to on ``event``; raises IllegalTransition."""
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(state, event) from None


def render_transitions() -> str:
    """The table as Markdown, one row per allowed transition, in the enums' order (for docs)."""
    rows = ["| state | event | next state |", "| --- | --- | --- |"]
    for state in InstanceState:
        for event in Event:
            new_state = TRANSITIONS.get((state, event))
            if new_state is not None:
                rows.append(f"| {state.name} | {event.name} | {new_state.name} |")
    return "\n".join(rows) + "\n"
