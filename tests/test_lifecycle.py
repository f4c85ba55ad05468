"""An instance's life: every allowed transition, a sample of illegal ones, and the docs' table."""

from __future__ import annotations

import itertools

import pytest

from scaler.lifecycle import (
    TRANSITIONS,
    Event,
    IllegalTransition,
    InstanceState,
    render_transitions,
    transition,
)

S = InstanceState
E = Event

ALLOWED = [
    (S.STARTING, E.LISTENING_HEALTHY, S.READY),
    (S.STARTING, E.START_FAILED, S.FAILED),
    (S.STARTING, E.EXITED, S.FAILED),
    (S.STARTING, E.STOP, S.STOPPING),
    (S.READY, E.DRAIN, S.DRAINING),
    (S.READY, E.UNHEALTHY, S.DRAINING),
    (S.READY, E.STOP, S.STOPPING),
    (S.READY, E.EXITED, S.FAILED),
    (S.DRAINING, E.DRAINED, S.STOPPING),
    (S.DRAINING, E.DRAIN_TIMEOUT, S.STOPPING),
    (S.DRAINING, E.STOP, S.STOPPING),
    (S.DRAINING, E.EXITED, S.FAILED),
    (S.DRAINING, E.UNHEALTHY, S.DRAINING),
    (S.STOPPING, E.EXITED, S.STOPPED),
    (S.STOPPING, E.STOP, S.STOPPING),
    (S.FAILED, E.STOP, S.STOPPING),
    (S.FAILED, E.EXITED, S.FAILED),
]

ILLEGAL = [
    (S.STARTING, E.DRAIN, "a starting instance has nothing to drain: stop it"),
    (S.STARTING, E.UNHEALTHY, "never healthy: judged by the start deadline instead"),
    (S.STARTING, E.DRAINED, "drained before draining"),
    (S.READY, E.LISTENING_HEALTHY, "already ready"),
    (S.READY, E.START_FAILED, "it did start"),
    (S.READY, E.DRAINED, "drained without draining"),
    (S.DRAINING, E.LISTENING_HEALTHY, "no way back into rotation"),
    (S.DRAINING, E.DRAIN, "draining twice"),
    (S.STOPPING, E.DRAIN, "draining after stop"),
    (S.STOPPING, E.LISTENING_HEALTHY, "no way back from stopping"),
    (S.STOPPED, E.STOP, "stopped is the end"),
    (S.STOPPED, E.EXITED, "exited twice"),
    (S.STOPPED, E.LISTENING_HEALTHY, "no resurrection"),
    (S.FAILED, E.LISTENING_HEALTHY, "a failed instance is replaced, never revived"),
    (S.FAILED, E.DRAIN, "a failed instance takes no requests to drain"),
]


@pytest.mark.parametrize(
    ("state", "event", "expected"),
    [pytest.param(s, e, n, id=f"{s.name}-{e.name}->{n.name}") for s, e, n in ALLOWED],
)
def test_allowed_transition(state: S, event: E, expected: S) -> None:
    """Each allowed (state, event) pair moves the instance to the state the design says."""
    assert transition(state, event) is expected


def test_table_is_exactly_the_allowed_list() -> None:
    """The table holds the allowed list and nothing more, so an added row needs a test row."""
    assert dict(TRANSITIONS) == {(s, e): n for s, e, n in ALLOWED}


@pytest.mark.parametrize(
    ("state", "event"),
    [pytest.param(s, e, id=f"{s.name}-{e.name}") for s, e, _why in ILLEGAL],
)
def test_illegal_transition_raises_naming_both(state: S, event: E) -> None:
    """An event out of place raises IllegalTransition naming the state and the event."""
    with pytest.raises(IllegalTransition) as info:
        transition(state, event)
    assert info.value.state is state
    assert info.value.event is event
    assert state.name in str(info.value)
    assert event.name in str(info.value)


def test_every_pair_outside_the_table_raises() -> None:
    """Every (state, event) pair not in the table raises, not only the sampled ones."""
    for state, event in itertools.product(InstanceState, Event):
        if (state, event) in TRANSITIONS:
            continue
        with pytest.raises(IllegalTransition):
            transition(state, event)


def test_stopped_is_the_only_dead_end() -> None:
    """Every state but STOPPED has a way out, and every state is reachable from STARTING."""
    exits = {s for s, _ in TRANSITIONS}
    assert set(InstanceState) - exits == {S.STOPPED}
    reached = {S.STARTING}
    frontier = [S.STARTING]
    while frontier:
        state = frontier.pop()
        for (source, _), target in TRANSITIONS.items():
            if source is state and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(InstanceState)


def test_states_use_the_metrics_labels() -> None:
    """The state values are the lowercase labels of tidegate_instances{state}."""
    assert [s.value for s in (S.STARTING, S.READY, S.DRAINING)] == [
        "starting",
        "ready",
        "draining",
    ]


def test_render_transitions_has_one_row_per_transition() -> None:
    """The rendered Markdown table has a header and one row per allowed transition, in order."""
    lines = render_transitions().splitlines()
    assert lines[:2] == ["| state | event | next state |", "| --- | --- | --- |"]
    assert lines[2] == "| STARTING | LISTENING_HEALTHY | READY |"
    assert len(lines) == 2 + len(TRANSITIONS)
    for state, event, new_state in ALLOWED:
        assert f"| {state.name} | {event.name} | {new_state.name} |" in lines
