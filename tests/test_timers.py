"""The timer wheel, driven by a fake loop whose clock the test advances."""

from __future__ import annotations

from typing import Any

from ingress.timers import TimerWheel


class FakeLoop:
    """Just what the wheel uses: time() and call_later(), with time advanced by the test."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.calls: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Any) -> Any:
        self.calls.append((self.now + delay, callback))
        return _Handle(self, callback)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted((when, cb) for when, cb in self.calls if when <= end)
            if not due:
                break
            when, callback = due[0]
            self.calls.remove((when, callback))
            self.now = when
            callback()
        self.now = end


class _Handle:
    def __init__(self, loop: FakeLoop, callback: Any) -> None:
        self._loop, self._callback = loop, callback

    def cancel(self) -> None:
        self._loop.calls = [(w, c) for w, c in self._loop.calls if c is not self._callback]


class Thing:
    def __init__(self) -> None:
        self.wheel_slot = -1
        self.fired: list[float] = []

    def on_deadline(self, now: float) -> None:
        self.fired.append(now)


def test_fires_once_not_early_and_within_one_resolution() -> None:
    """A deadline fires exactly once, never before it, at most one tick after it."""
    loop = FakeLoop()
    wheel = TimerWheel(loop, resolution=0.1)  # type: ignore[arg-type]
    thing = Thing()
    wheel.schedule(thing, loop.now + 1.0)
    loop.advance(0.95)
    assert thing.fired == []
    loop.advance(1.0)
    assert len(thing.fired) == 1
    assert 1001.0 <= thing.fired[0] <= 1001.2


def test_rescheduling_moves_the_deadline() -> None:
    """Scheduling again replaces the earlier deadline, later or sooner."""
    loop = FakeLoop()
    wheel = TimerWheel(loop, resolution=0.1)  # type: ignore[arg-type]
    thing = Thing()
    wheel.schedule(thing, loop.now + 1.0)
    wheel.schedule(thing, loop.now + 5.0)
    loop.advance(2.0)
    assert thing.fired == []
    wheel.schedule(thing, loop.now + 0.5)
    loop.advance(1.0)
    assert len(thing.fired) == 1


def test_cancel_and_idle_wheel_stops_ticking() -> None:
    """A cancelled deadline never fires, and a wheel with nothing scheduled arms no timer."""
    loop = FakeLoop()
    wheel = TimerWheel(loop, resolution=0.1)  # type: ignore[arg-type]
    thing = Thing()
    wheel.schedule(thing, loop.now + 0.5)
    wheel.cancel(thing)
    loop.advance(2.0)
    assert thing.fired == []
    assert loop.calls == []


def test_past_deadline_fires_on_next_tick_not_synchronously() -> None:
    """A deadline already past fires on the next tick, never inside schedule()."""
    loop = FakeLoop()
    wheel = TimerWheel(loop, resolution=0.1)  # type: ignore[arg-type]
    thing = Thing()
    wheel.schedule(thing, loop.now - 10)
    assert thing.fired == []
    loop.advance(0.2)
    assert len(thing.fired) == 1


def test_callback_may_reschedule_itself() -> None:
    """on_deadline can schedule the next deadline (the hold queue does this)."""
    loop = FakeLoop()
    wheel = TimerWheel(loop, resolution=0.1)  # type: ignore[arg-type]

    class Again(Thing):
        def on_deadline(self, now: float) -> None:
            super().on_deadline(now)
            if len(self.fired) < 3:
                wheel.schedule(self, now + 1.0)

    thing = Again()
    wheel.schedule(thing, loop.now + 1.0)
    loop.advance(10)
    assert len(thing.fired) == 3
