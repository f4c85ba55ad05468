"""Tests for ingress.balancer: choice, fairness, limits, FIFO holding and instance lifecycle."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ingress.balancer import HeldRequest, Instance, ServiceBalancer


class Recorder:
    """A waiter that remembers its grant, optionally logging it and reacting to it."""

    def __init__(
        self,
        name: str = "",
        log: list[Recorder] | None = None,
        on_grant: Callable[[Recorder, Instance], None] | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self.on_grant = on_grant
        self.granted: list[Instance] = []

    def grant(self, instance: Instance) -> None:
        self.granted.append(instance)
        if self.log is not None:
            self.log.append(self)
        if self.on_grant is not None:
            self.on_grant(self, instance)

    def __repr__(self) -> str:
        return f"Recorder({self.name!r})"


def addr(i: int) -> tuple[str, int]:
    return ("10.0.0.1", 8000 + i)


def make(
    ids: str = "abc",
    *,
    max_concurrency: int | None = 2,
    queue_max_length: int = 10,
    queue_timeout: float = 5.0,
    on_drained: Callable[[Instance], None] | None = None,
    state: str = "ready",
) -> ServiceBalancer:
    bal = ServiceBalancer(
        "svc",
        max_concurrency=max_concurrency,
        queue_max_length=queue_max_length,
        queue_timeout=queue_timeout,
        on_drained=on_drained,
    )
    bal.set_instances((i, addr(n), state) for n, i in enumerate(ids))
    return bal


def by_id(bal: ServiceBalancer) -> dict[str, Instance]:
    return {inst.id: inst for inst in bal.instances() if inst.state != "removed"}


def fill(bal: ServiceBalancer) -> list[Instance]:
    """Acquire until every ready instance is full; returns the slots taken."""
    taken = []
    while (inst := bal.acquire()) is not None:
        taken.append(inst)
    return taken


def load(loads: dict[str, int], max_concurrency: int | None) -> ServiceBalancer:
    """A balancer whose instances carry exactly `loads`, built through the public API only."""
    bal = make("".join(loads), max_concurrency=None)
    top = max(loads.values())
    slots = [bal.acquire() for _ in range(top * len(loads))]
    for inst in slots:
        assert inst is not None
        if inst.inflight > loads[inst.id]:
            bal.release(inst)
    assert {i: inst.inflight for i, inst in by_id(bal).items()} == loads
    bal.update_limits(max_concurrency=max_concurrency, queue_max_length=10, queue_timeout=5.0)
    return bal


# -- choosing an instance ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("loads", "max_concurrency", "expected"),
    [
        pytest.param({"a": 3, "b": 1, "c": 2}, None, "b", id="fewest-in-flight-wins"),
        pytest.param({"a": 0, "b": 5, "c": 5}, None, "a", id="idle-instance-wins"),
        pytest.param({"a": 2, "b": 2, "c": 1}, 2, "c", id="full-instances-skipped"),
        pytest.param({"a": 9, "b": 3, "c": 7}, 4, "b", id="one-below-limit"),
        pytest.param({"a": 4, "b": 4, "c": 4}, 4, None, id="all-full-none"),
        pytest.param({"a": 1}, 1, None, id="single-full-none"),
        pytest.param({"a": 5, "b": 2}, 2, None, id="lowered-limit-none"),
    ],
)
def test_least_outstanding_choice(loads, max_concurrency, expected):
    """acquire picks the ready instance with the fewest in-flight requests, within the limit."""
    bal = load(loads, max_concurrency)
    inst = bal.acquire()
    assert (inst.id if inst else None) == expected


@pytest.mark.parametrize(
    ("ids", "held_each", "cycles"),
    [
        pytest.param("abc", 0, 300, id="three-idle"),
        pytest.param("abc", 1, 300, id="three-busy"),
        pytest.param("abcdefg", 0, 700, id="seven-idle"),
        pytest.param("ab", 3, 200, id="two-busy"),
    ],
)
def test_fair_rotation_among_ties(ids, held_each, cycles):
    """Among equally loaded instances acquire rotates, so cycles spread exactly evenly."""
    bal = make(ids, max_concurrency=None)
    for _ in range(held_each * len(ids)):
        bal.acquire()
    chosen = []
    for _ in range(cycles):
        inst = bal.acquire()
        assert inst is not None
        chosen.append(inst.id)
        bal.release(inst)
    assert Counter(chosen) == {i: cycles // len(ids) for i in ids}
    # Round robin, not merely balanced in total: each window of len(ids) covers all of them.
    for start in range(0, cycles, len(ids)):
        assert sorted(chosen[start : start + len(ids)]) == sorted(ids)


def test_max_concurrency_none_is_unlimited():
    """With max_concurrency None a single instance takes any number of requests."""
    bal = make("a", max_concurrency=None)
    for _ in range(10_000):
        assert bal.acquire() is not None
    assert bal.inflight == 10_000
    assert bal.can_serve_now()


def test_stats_counters():
    """arrivals counts acquire calls (held and refused ones too), completions counts releases."""
    bal = make("a", max_concurrency=1, queue_max_length=1)
    first = bal.acquire()
    assert first is not None
    assert bal.acquire() is None
    assert bal.hold(Recorder(), now=0.0) is not None
    assert bal.acquire() is None
    assert bal.hold(Recorder(), now=0.0) is None  # queue full
    bal.release(first)  # grants the held one
    assert (bal.arrivals, bal.completions, bal.inflight, bal.queued) == (3, 1, 1, 0)
    assert bal.ready_count == 1


# -- holding ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("queue_max_length", "holds", "accepted"),
    [
        pytest.param(0, 3, 0, id="zero-length-queue-refuses-all"),
        pytest.param(1, 3, 1, id="one-slot"),
        pytest.param(3, 3, 3, id="exactly-full"),
        pytest.param(5, 8, 5, id="overflow"),
    ],
)
def test_queue_full_refuses(queue_max_length, holds, accepted):
    """hold returns None once queue_max_length requests are held, and keeps the rest FIFO."""
    bal = make("a", max_concurrency=1, queue_max_length=queue_max_length)
    slot = bal.acquire()
    assert slot is not None
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(holds)]
    tokens = [bal.hold(w, now=float(n)) for n, w in enumerate(waiters)]
    assert [t is not None for t in tokens] == [True] * accepted + [False] * (holds - accepted)
    assert bal.queued == accepted
    for _ in range(accepted + 1):
        bal.release(slot)  # one instance: each freed slot goes to the next held request
    assert log == waiters[:accepted]
    assert (bal.inflight, bal.queued) == (0, 0)


def test_new_request_does_not_jump_the_queue():
    """While requests are held, acquire returns None even if a slot became free."""
    bal = make("a", max_concurrency=1)
    slot = bal.acquire()
    assert slot is not None
    w = Recorder()
    assert bal.hold(w, now=0.0) is not None
    bal.release(slot)
    assert w.granted == [slot]
    assert bal.acquire() is None  # the held request took the freed slot
    assert bal.hold(Recorder(), now=0.0) is not None
    assert bal.acquire() is None  # held requests exist: must queue behind them


def test_freed_slot_goes_to_oldest_waiter_at_once():
    """release on a full ready instance hands its slot to the oldest held request synchronously."""
    bal = make("ab", max_concurrency=1)
    a, b = fill(bal)
    log: list[Recorder] = []
    first, second, third = Recorder("1", log), Recorder("2", log), Recorder("3", log)
    for n, w in enumerate((first, second, third)):
        bal.hold(w, now=float(n))
    bal.release(b)
    assert log == [first]
    assert first.granted == [b]
    assert b.inflight == 1
    bal.release(a)
    assert log == [first, second]
    assert second.granted == [a]
    assert (bal.queued, bal.inflight) == (1, 2)


def test_hold_with_free_capacity_grants_at_once():
    """hold on a service with a free slot and no queue grants before returning."""
    bal = make("a", max_concurrency=1)
    w = Recorder()
    token = bal.hold(w, now=1.0)
    assert token is not None
    assert [i.id for i in w.granted] == ["a"]
    assert (bal.queued, bal.inflight) == (0, 1)
    bal.cancel(token)  # granted already: a no-op
    assert (bal.queued, bal.inflight) == (0, 1)


@pytest.mark.parametrize(
    ("now", "expired"),
    [
        pytest.param(4.9, [], id="none-yet"),
        pytest.param(5.0, [0], id="deadline-is-inclusive"),
        pytest.param(6.5, [0, 1], id="oldest-two"),
        pytest.param(100.0, [0, 1, 2, 3], id="all"),
    ],
)
def test_expire_returns_oldest_expired_only(now, expired):
    """expire returns, oldest first, exactly the held requests whose deadline is <= now."""
    bal = make("a", max_concurrency=1, queue_timeout=5.0)
    fill(bal)
    waiters = [Recorder(str(n)) for n in range(4)]
    for n, w in enumerate(waiters):
        bal.hold(w, now=float(n))
    assert bal.expire(now) == [waiters[n] for n in expired]
    assert bal.queued == 4 - len(expired)
    assert bal.next_deadline() == (None if len(expired) == 4 else 5.0 + len(expired))
    assert bal.expire(now) == []


def test_next_deadline_follows_the_head():
    """next_deadline is the oldest live held request's deadline, None when nothing is held."""
    bal = make("a", max_concurrency=1, queue_timeout=2.0)
    fill(bal)
    assert bal.next_deadline() is None
    t0 = bal.hold(Recorder(), now=10.0)
    t1 = bal.hold(Recorder(), now=11.0)
    assert t0 is not None and t1 is not None
    assert (t0.deadline, t1.deadline, bal.next_deadline()) == (12.0, 13.0, 12.0)
    bal.cancel(t0)
    assert bal.next_deadline() == 13.0
    bal.cancel(t1)
    assert bal.next_deadline() is None


def test_cancel_keeps_queued_exact_and_is_skipped():
    """Cancelling held requests in any order keeps queued exact and grants skip them."""
    rng = random.Random(7)
    bal = make("a", max_concurrency=1, queue_max_length=5000)
    slot = bal.acquire()
    assert slot is not None
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(5000)]
    tokens = [bal.hold(w, now=0.0) for w in waiters]
    assert all(t is not None for t in tokens)
    order = list(range(5000))
    rng.shuffle(order)
    cancelled = set(order[:4990])
    for n, index in enumerate(order[:4990]):
        token = tokens[index]
        assert token is not None
        bal.cancel(token)
        bal.cancel(token)  # twice: a no-op
        assert bal.queued == 5000 - n - 1
    survivors = [w for n, w in enumerate(waiters) if n not in cancelled]
    for _ in survivors:
        bal.release(slot)
        slot = log[-1].granted[0]
    assert log == survivors
    assert bal.queued == 0
    assert bal.next_deadline() is None


def test_cancel_after_expire_or_close_is_noop():
    """cancel of a request already expired or closed changes nothing."""
    bal = make("a", max_concurrency=1, queue_timeout=1.0)
    fill(bal)
    expired = bal.hold(Recorder(), now=0.0)
    live = bal.hold(Recorder(), now=5.0)
    assert isinstance(expired, HeldRequest) and isinstance(live, HeldRequest)
    assert len(bal.expire(2.0)) == 1
    bal.cancel(expired)
    assert bal.queued == 1
    bal.close()
    bal.cancel(live)
    assert bal.queued == 0


def test_held_request_records_arrival_for_queue_wait():
    """A held request carries its arrival time and its deadline arrival + queue_timeout."""
    bal = make("a", max_concurrency=1, queue_timeout=30.0)
    fill(bal)
    held = bal.hold(Recorder(), now=100.0)
    assert held is not None
    assert (held.arrived, held.deadline) == (100.0, 130.0)


def test_changed_timeout_applies_to_held_requests():
    """update_limits with a new queue_timeout re-times held requests from their arrival."""
    bal = make("a", max_concurrency=1, queue_timeout=30.0)
    fill(bal)
    first = Recorder()
    old = bal.hold(first, now=0.0)
    new = bal.hold(Recorder(), now=1.0)
    assert old is not None and new is not None
    bal.update_limits(max_concurrency=1, queue_max_length=10, queue_timeout=5.0)
    assert (old.deadline, new.deadline, bal.next_deadline()) == (5.0, 6.0, 5.0)
    assert bal.expire(5.5) == [first]


def test_lowering_queue_length_keeps_held_requests():
    """A shorter queue refuses new holds but keeps the requests already held."""
    bal = make("a", max_concurrency=1, queue_max_length=3)
    fill(bal)
    for n in range(3):
        bal.hold(Recorder(), now=float(n))
    bal.update_limits(max_concurrency=1, queue_max_length=1, queue_timeout=5.0)
    assert bal.queued == 3
    assert bal.hold(Recorder(), now=9.0) is None


def test_close_returns_all_waiters_and_refuses_more():
    """close returns every held waiter oldest first and afterwards nothing is taken or held."""
    drained: list[str] = []
    bal = make("ab", max_concurrency=1, on_drained=lambda i: drained.append(i.id))
    a, b = fill(bal)
    waiters = [Recorder(str(n)) for n in range(4)]
    tokens = [bal.hold(w, now=float(n)) for n, w in enumerate(waiters)]
    assert tokens[1] is not None
    bal.cancel(tokens[1])
    assert bal.close() == [waiters[0], waiters[2], waiters[3]]
    assert (bal.queued, bal.ready_count, bal.next_deadline()) == (0, 0, None)
    assert bal.acquire() is None
    assert bal.hold(Recorder(), now=5.0) is None
    assert bal.close() == []
    bal.release(a)
    bal.release(b)
    assert drained == ["a", "b"]
    assert list(bal.instances()) == []
    with pytest.raises(RuntimeError):
        bal.set_instances([("a", addr(0), "ready")])


# -- capacity changes -------------------------------------------------------------------------


def test_new_ready_instance_grants_up_to_its_capacity():
    """A ready instance added while requests are held takes the oldest of them, up to its limit."""
    bal = make("a", max_concurrency=2)
    fill(bal)
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(5)]
    for n, w in enumerate(waiters):
        bal.hold(w, now=float(n))
    bal.set_instances([("a", addr(0), "ready"), ("b", addr(1), "ready")])
    assert log == waiters[:2]
    assert all(w.granted[0].id == "b" for w in log)
    assert (bal.queued, bal.inflight, by_id(bal)["b"].inflight) == (3, 4, 2)


def test_new_instances_grant_to_least_loaded():
    """Several new instances share the held requests evenly, oldest first."""
    bal = make("", max_concurrency=3)
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(6)]
    for n, w in enumerate(waiters):
        assert bal.hold(w, now=float(n)) is not None
    assert bal.queued == 6  # no instance yet: a cold start
    bal.set_instances([(i, addr(n), "ready") for n, i in enumerate("xyz")])
    assert log == waiters
    assert [w.granted[0].id for w in log] == ["x", "y", "z", "x", "y", "z"]


@pytest.mark.parametrize(
    ("old", "new", "granted"),
    [
        pytest.param(1, 3, 4, id="raise-grants-two-per-instance"),
        pytest.param(1, None, 6, id="unlimited-grants-all"),
        pytest.param(2, 2, 0, id="same-limit-nothing"),
        pytest.param(2, 1, 0, id="lower-limit-nothing"),
    ],
)
def test_update_limits_grants_waiters(old, new, granted):
    """Raising max_concurrency grants held requests at once, oldest first; lowering takes none."""
    bal = make("ab", max_concurrency=old)
    fill(bal)
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(6)]
    for n, w in enumerate(waiters):
        bal.hold(w, now=float(n))
    bal.update_limits(max_concurrency=new, queue_max_length=10, queue_timeout=5.0)
    assert log == waiters[:granted]
    assert bal.queued == 6 - granted


def test_lowered_limit_gives_busy_instance_nothing_new():
    """After lowering max_concurrency an instance above it gets nothing until below it."""
    bal = make("a", max_concurrency=3)
    slots = fill(bal)
    bal.update_limits(max_concurrency=1, queue_max_length=10, queue_timeout=5.0)
    w = Recorder()
    bal.hold(w, now=0.0)
    bal.release(slots.pop())
    assert w.granted == []
    bal.release(slots.pop())
    assert w.granted == []  # at 1: still full
    bal.release(slots.pop())
    assert len(w.granted) == 1


@pytest.mark.parametrize(
    ("max_concurrency", "queue_max_length", "queue_timeout"),
    [
        pytest.param(0, 1, 1.0, id="zero-concurrency"),
        pytest.param(1, -1, 1.0, id="negative-queue"),
        pytest.param(1, 1, -1.0, id="negative-timeout"),
    ],
)
def test_update_limits_rejects_bad_values(max_concurrency, queue_max_length, queue_timeout):
    """Out-of-range limits raise ValueError and leave the balancer as it was."""
    bal = make("a", max_concurrency=1)
    with pytest.raises(ValueError):
        bal.update_limits(
            max_concurrency=max_concurrency,
            queue_max_length=queue_max_length,
            queue_timeout=queue_timeout,
        )
    assert bal.acquire() is not None
    assert bal.acquire() is None


# -- instance lifecycle -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("update", "ready", "states"),
    [
        pytest.param(
            [("a", 0, "ready"), ("b", 1, "ready")], "ab", {"a": "ready", "b": "ready"}, id="same"
        ),
        pytest.param(
            [("a", 0, "draining"), ("b", 1, "ready")],
            "b",
            {"a": "draining", "b": "ready"},
            id="drain-one",
        ),
        pytest.param([("b", 1, "ready")], "b", {"b": "ready"}, id="missing-is-removed"),
        pytest.param(
            [("a", 5, "ready"), ("b", 1, "ready")],
            "ab",
            {"a": "ready", "b": "ready"},
            id="new-address-replaces",
        ),
        pytest.param(
            [("a", 0, "ready"), ("b", 1, "ready"), ("c", 2, "draining")],
            "ab",
            {"a": "ready", "b": "ready", "c": "draining"},
            id="added-draining",
        ),
        pytest.param([], "", {}, id="empty"),
    ],
)
def test_set_instances_states(update, ready, states):
    """set_instances adds, updates and removes instances; only ready ones are ever chosen."""
    bal = make("ab", max_concurrency=None)
    bal.set_instances((i, addr(n), s) for i, n, s in update)
    assert {i: inst.state for i, inst in by_id(bal).items()} == states
    assert bal.ready_count == len(ready)
    chosen = {bal.acquire() for _ in range(20)}
    assert {inst.id for inst in chosen if inst} == set(ready)


def test_draining_gets_nothing_new_and_reports_once_at_zero():
    """A draining instance gets no new or held requests and on_drained fires once, at zero."""
    drained: list[Instance] = []
    bal = make("ab", max_concurrency=2, on_drained=drained.append)
    slots = fill(bal)
    a = by_id(bal)["a"]
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    w = Recorder()
    bal.hold(w, now=0.0)
    a_slots = [s for s in slots if s is a]
    bal.release(a_slots[0])
    assert (w.granted, drained, bal.queued) == ([], [], 1)
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])  # repeated
    bal.release(a_slots[1])
    assert drained == [a]
    assert a.state == "draining" and a in bal.instances()
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    assert drained == [a]  # still once
    assert w.granted == []


def test_draining_at_zero_is_reported_at_once():
    """A ready instance with nothing in flight that turns draining is reported immediately."""
    drained: list[str] = []
    bal = make("ab", on_drained=lambda i: drained.append(i.id))
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    assert drained == ["a"]
    bal.set_instances(
        [("a", addr(0), "draining"), ("b", addr(1), "ready"), ("c", addr(2), "draining")]
    )
    assert drained == ["a", "c"]


def test_removed_instance_forgotten_after_draining():
    """A removed instance is kept while busy, then reported and forgotten; a late release raises."""
    drained: list[Instance] = []
    bal = make("ab", max_concurrency=1, on_drained=drained.append)
    a, _ = fill(bal)
    bal.set_instances([("b", addr(1), "ready")])
    assert a.state == "removed"
    assert a in bal.instances()
    assert bal.inflight == 2
    bal.release(a)
    assert drained == [a]
    assert a not in bal.instances()
    assert bal.inflight == 1
    with pytest.raises(ValueError):
        bal.release(a)
    assert (bal.inflight, bal.completions) == (1, 1)


def test_idle_removed_instance_reported_and_forgotten_at_once():
    """Removing an idle instance reports it and forgets it in the same call."""
    drained: list[str] = []
    bal = make("ab", on_drained=lambda i: drained.append(i.id))
    bal.set_instances([("b", addr(1), "ready")])
    assert drained == ["a"]
    assert [i.id for i in bal.instances()] == ["b"]


def test_drained_then_removed_is_not_reported_twice():
    """An instance reported drained while draining is forgotten silently when removed."""
    drained: list[str] = []
    bal = make("ab", on_drained=lambda i: drained.append(i.id))
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    bal.set_instances([("b", addr(1), "ready")])
    assert drained == ["a"]
    assert [i.id for i in bal.instances()] == ["b"]


def test_address_change_replaces_instance():
    """A known id with a new address is a new instance; the old one drains and is reported."""
    drained: list[Instance] = []
    bal = make("a", max_concurrency=1, on_drained=drained.append)
    old = bal.acquire()
    assert old is not None
    bal.set_instances([("a", addr(9), "ready")])
    new = bal.acquire()
    assert new is not None and new is not old
    assert (old.state, new.state, new.address) == ("removed", "ready", addr(9))
    assert {i.id for i in bal.instances()} == {"a"} and len(bal.instances()) == 2
    bal.release(old)
    assert drained == [old]
    assert bal.instances() == [new]


def test_draining_back_to_ready_grants_waiters():
    """A draining instance set ready again re-enters the rotation and takes held requests."""
    drained: list[str] = []
    bal = make("a", max_concurrency=2, on_drained=lambda i: drained.append(i.id))
    bal.set_instances([("a", addr(0), "draining")])
    assert drained == ["a"]
    log: list[Recorder] = []
    waiters = [Recorder(str(n), log) for n in range(3)]
    for n, w in enumerate(waiters):
        bal.hold(w, now=float(n))
    bal.set_instances([("a", addr(0), "ready")])
    assert log == waiters[:2]
    assert bal.ready_count == 1
    slot = waiters[0].granted[0]
    bal.set_instances([("a", addr(0), "draining")])
    bal.release(slot)
    bal.release(slot)
    assert drained == ["a", "a"]  # a second drain is a second report


@pytest.mark.parametrize(
    "update",
    [
        pytest.param([("a", addr(0), "starting")], id="unknown-state"),
        pytest.param([("a", addr(0), "removed")], id="removed-is-not-settable"),
        pytest.param([("a", addr(0), "ready"), ("a", addr(1), "ready")], id="duplicate-id"),
        pytest.param([("b", addr(1), "ready"), ("z", addr(2), "bogus")], id="bad-late-entry"),
    ],
)
def test_set_instances_rejects_bad_lists_without_change(update):
    """A malformed instance list raises ValueError and changes nothing."""
    bal = make("a", max_concurrency=1)
    with pytest.raises(ValueError):
        bal.set_instances(update)
    assert [(i.id, i.state) for i in bal.instances()] == [("a", "ready")]


def test_release_errors():
    """Releasing more than acquired, or another service's instance, raises."""
    bal = make("a")
    other = make("a")
    inst = bal.acquire()
    assert inst is not None
    bal.release(inst)
    with pytest.raises(ValueError):
        bal.release(inst)
    foreign = other.acquire()
    assert foreign is not None
    with pytest.raises(ValueError):
        bal.release(foreign)
    assert (bal.inflight, bal.completions) == (0, 1)


# -- re-entrancy ------------------------------------------------------------------------------


def test_reentrant_release_inside_grant():
    """Waiters that release inside grant are served in FIFO order by a loop, not by recursion."""
    bal = make("a", max_concurrency=1, queue_max_length=5000)
    slot = bal.acquire()
    assert slot is not None
    log: list[Recorder] = []

    def bounce(w: Recorder, inst: Instance) -> None:
        assert inst.inflight == 1  # the slot is already taken when grant runs
        bal.release(inst)

    # More than the default recursion limit: a recursive dispatch would overflow.
    waiters = [Recorder(str(n), log, bounce) for n in range(3000)]
    for w in waiters:
        bal.hold(w, now=0.0)
    bal.release(slot)
    assert log == waiters
    assert (bal.queued, bal.inflight, bal.completions) == (0, 0, 3001)
    assert bal.acquire() is slot


def test_reentrant_hold_and_cancel_inside_grant():
    """A grant that holds a new request and cancels an older one leaves the queue exact."""
    bal = make("a", max_concurrency=1)
    slot = bal.acquire()
    assert slot is not None
    log: list[Recorder] = []
    tokens: dict[str, HeldRequest] = {}
    late = Recorder("late", log)

    def meddle(w: Recorder, inst: Instance) -> None:
        bal.cancel(tokens["2"])
        held = bal.hold(late, now=1.0)
        assert held is not None
        bal.release(inst)

    first = Recorder("1", log, meddle)
    second = Recorder("2", log)
    third = Recorder("3", log)
    for w in (first, second, third):
        token = bal.hold(w, now=0.0)
        assert token is not None
        tokens[w.name] = token
    bal.release(slot)
    assert log == [first, third]
    assert (bal.queued, bal.inflight) == (1, 1)
    bal.release(third.granted[0])
    assert log == [first, third, late]


def test_acquire_inside_grant_does_not_jump_the_queue():
    """A request arriving inside a grant, after a slot was freed there, queues behind the held."""
    bal = make("a", max_concurrency=1)
    slot = bal.acquire()
    assert slot is not None
    log: list[Recorder] = []
    jumped: list[Instance | None] = []

    def release_then_acquire(w: Recorder, inst: Instance) -> None:
        bal.release(inst)
        jumped.append(bal.acquire())

    first = Recorder("1", log, release_then_acquire)
    second = Recorder("2", log)
    bal.hold(first, now=0.0)
    bal.hold(second, now=0.0)
    bal.release(slot)
    assert jumped == [None]
    assert log == [first, second]
    assert (bal.queued, bal.inflight) == (0, 1)


def test_on_drained_may_reenter():
    """on_drained runs after the balancer's state is complete, so it may call set_instances."""
    bal: ServiceBalancer

    def forget(inst: Instance) -> None:
        bal.set_instances([(i.id, i.address, "ready") for i in bal.instances() if i is not inst])

    bal = make("ab", on_drained=forget)
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    assert [i.id for i in bal.instances()] == ["b"]


# -- random interleavings ---------------------------------------------------------------------

IDS = "abcd"


class BalancerMachine(RuleBasedStateMachine):
    """Random operations against a model of exact counts and a FIFO queue."""

    @initialize(
        max_concurrency=st.sampled_from([1, 2, 3, None]),
        queue_max_length=st.integers(0, 6),
    )
    def start(self, max_concurrency, queue_max_length):
        self.max = max_concurrency
        self.queue_max = queue_max_length
        self.timeout = 3.0
        self.now = 0.0
        self.slots: Counter[Instance] = Counter()  # acquired + granted - released
        self.active: list[Instance] = []  # one entry per slot the "proxy" holds
        self.queue: list[Recorder] = []  # the model FIFO
        self.arrived: dict[Recorder, float] = {}
        self.tokens: list[HeldRequest] = []
        self.reported: set[Instance] = set()
        self.acquires = 0
        self.releases = 0
        self.bal = ServiceBalancer(
            "svc",
            max_concurrency=max_concurrency,
            queue_max_length=queue_max_length,
            queue_timeout=self.timeout,
            on_drained=self.on_drained,
        )

    def on_drained(self, inst: Instance) -> None:
        assert inst.inflight == 0 and inst.state != "ready"
        assert inst not in self.reported
        self.reported.add(inst)

    def check_taken(self, inst: Instance) -> None:
        assert inst.state == "ready"
        assert self.max is None or inst.inflight <= self.max
        others = [i.inflight for i in self.bal.instances() if i.state == "ready" and i is not inst]
        assert inst.inflight - 1 <= min(others, default=inst.inflight)
        self.slots[inst] += 1

    def grant(self, waiter: Recorder, inst: Instance) -> None:
        assert self.queue and self.queue[0] is waiter, "grants must follow FIFO order"
        self.queue.pop(0)
        self.check_taken(inst)
        if waiter.name == "bounce":  # its client left at once: re-entrant release
            self.release_one(inst)
        else:
            self.active.append(inst)

    def release_one(self, inst: Instance) -> None:
        self.slots[inst] -= 1
        self.releases += 1
        self.bal.release(inst)

    @rule()
    def acquire(self):
        self.acquires += 1
        inst = self.bal.acquire()
        if inst is None:
            assert self.queue or not self.bal.can_serve_now()
        else:
            assert not self.queue
            self.check_taken(inst)
            self.active.append(inst)

    @rule(bounce=st.booleans())
    def hold(self, bounce):
        waiter = Recorder("bounce" if bounce else "stay", on_grant=self.grant)
        self.queue.append(waiter)  # before hold: it may grant at once
        self.arrived[waiter] = self.now
        token = self.bal.hold(waiter, self.now)
        if token is None:
            assert self.queue.pop() is waiter
            assert len(self.queue) >= self.queue_max
        else:
            self.tokens.append(token)

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def release(self, data):
        index = data.draw(st.integers(0, len(self.active) - 1))
        self.release_one(self.active.pop(index))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def cancel(self, data):
        token = data.draw(st.sampled_from(self.tokens))
        if token.waiter in self.queue:
            self.queue.remove(token.waiter)
        self.bal.cancel(token)

    @rule(step=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
    def expire(self, step):
        self.now += step
        out = self.bal.expire(self.now)
        due = [w for w in self.queue if self.arrived[w] + self.timeout <= self.now]
        assert out == due
        assert self.queue[: len(due)] == due
        del self.queue[: len(due)]

    @rule(
        states=st.lists(st.sampled_from([None, "ready", "draining"]), min_size=4, max_size=4),
        ports=st.lists(st.integers(0, 1), min_size=4, max_size=4),
    )
    def set_instances(self, states, ports):
        spec = [(i, addr(p), s) for i, p, s in zip(IDS, ports, states, strict=True) if s]
        self.bal.set_instances(spec)
        for inst in self.bal.instances():
            if inst.state == "ready":
                self.reported.discard(inst)

    @rule(
        max_concurrency=st.sampled_from([1, 2, 3, None]),
        queue_max_length=st.integers(0, 6),
        timeout=st.sampled_from([1.0, 3.0]),
    )
    def update_limits(self, max_concurrency, queue_max_length, timeout):
        self.max, self.queue_max, self.timeout = max_concurrency, queue_max_length, timeout
        self.bal.update_limits(
            max_concurrency=max_concurrency,
            queue_max_length=queue_max_length,
            queue_timeout=timeout,
        )

    @invariant()
    def counts_are_exact(self):
        for inst, count in self.slots.items():
            assert inst.inflight == count
        assert self.bal.inflight == sum(self.slots.values())
        assert self.bal.queued == len(self.queue)
        assert (self.bal.arrivals, self.bal.completions) == (self.acquires, self.releases)

    @invariant()
    def held_only_without_capacity(self):
        assert not self.bal.queued or not self.bal.can_serve_now()

    @invariant()
    def instances_kept_exactly_while_needed(self):
        known = self.bal.instances()
        assert self.bal.ready_count == sum(i.state == "ready" for i in known)
        busy_removed = {i for i, n in self.slots.items() if n and i.state == "removed"}
        assert busy_removed == {i for i in known if i.state == "removed"}
        for inst in known:
            if inst.state != "ready" and inst.inflight == 0:
                assert inst in self.reported

    @invariant()
    def deadline_is_head(self):
        expected = self.arrived[self.queue[0]] + self.timeout if self.queue else None
        assert self.bal.next_deadline() == expected


TestBalancerMachine = BalancerMachine.TestCase
TestBalancerMachine.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# -- ejection ------------------------------------------------------------------------------------


def test_an_ejected_instance_gets_nothing_new_until_its_time_is_up() -> None:
    bal = make("ab", max_concurrency=None)
    a, b = by_id(bal)["a"], by_id(bal)["b"]
    assert bal.eject(a, until=10.0)
    assert not bal.eject(a, until=20.0)  # already out
    assert [bal.acquire() for _ in range(3)] == [b, b, b]
    assert bal.next_deadline() == 10.0
    assert bal.expire(9.9) == []
    assert bal.acquire() is b  # still out
    assert bal.expire(10.0) == []
    assert bal.next_deadline() is None
    assert bal.acquire() is a  # back, and the least loaded


def test_ejecting_the_last_instance_holds_requests_until_it_is_back() -> None:
    bal = make("a", max_concurrency=1)
    a = by_id(bal)["a"]
    first = bal.acquire()
    assert first is a
    bal.eject(a, until=5.0)
    waiter = Recorder("w")
    assert bal.hold(waiter, now=1.0) is not None
    bal.release(a)  # the failed request lets go: no grant to an ejected instance
    assert waiter.granted == []
    assert bal.next_deadline() == 5.0  # before the held request's own deadline (6.0)
    bal.expire(5.0)
    assert waiter.granted == [a]


def test_an_ejected_instance_at_zero_is_not_reported_drained() -> None:
    drained: list[str] = []
    bal = make("ab", max_concurrency=None, on_drained=lambda i: drained.append(i.id))
    a = bal.acquire()
    assert a is not None
    bal.eject(a, until=3.0)
    bal.release(a)
    assert drained == []
    assert a.inflight == 0


def test_draining_or_removing_an_ejected_instance_ends_the_ejection() -> None:
    drained: list[str] = []
    bal = make("ab", max_concurrency=None, on_drained=lambda i: drained.append(i.id))
    a = by_id(bal)["a"]
    bal.eject(a, until=3.0)
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    assert drained == ["a"]
    assert bal.next_deadline() is None
    bal.set_instances([("a", addr(0), "ready"), ("b", addr(1), "ready")])
    assert {bal.acquire(), bal.acquire()} == {a, by_id(bal)["b"]}  # ready again, in rotation
    b = by_id(bal)["b"]
    bal.eject(b, until=3.0)
    bal.set_instances([("a", addr(0), "ready")])  # b removed while out
    assert bal.next_deadline() is None
    bal.expire(5.0)
    assert all(i.id == "a" for i in [bal.acquire(), bal.acquire()])


def test_only_a_ready_instance_of_this_service_can_be_ejected() -> None:
    bal = make("ab", max_concurrency=None)
    other = make("x")
    bal.set_instances([("a", addr(0), "draining"), ("b", addr(1), "ready")])
    assert not bal.eject(by_id(bal)["a"], until=1.0)
    assert not bal.eject(by_id(other)["x"], until=1.0)
