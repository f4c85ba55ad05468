"""A coarse timer wheel: one loop timer for every deadline of the ingress.

Each client connection has one deadline at a time (head, keep-alive idle or whole request) and
each service one (its oldest held request). Arming an asyncio timer per request costs a handle
and a heap push, and cancelling it another; here moving a deadline is two set operations, and
one loop timer ticks every `resolution` seconds while anything is scheduled. Deadlines fire up
to one resolution late, never early: fine for timeouts measured in seconds.
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Timed(Protocol):
    """Something with a deadline; the wheel stores its slot on it to move it in O(1)."""

    wheel_slot: int  # -1 when not scheduled

    def on_deadline(self, now: float) -> None: ...


class TimerWheel:
    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.05) -> None:
        self._loop = loop
        self._resolution = resolution
        self._slots: dict[int, set[Timed]] = {}
        self._last = math.floor(loop.time() / resolution)
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self, obj: Timed, deadline: float) -> None:
        """Call obj.on_deadline once, at or shortly after `deadline` (replaces any earlier one)."""
        slot = math.ceil(deadline / self._resolution)
        old = obj.wheel_slot
        if old == slot:
            return
        if old >= 0:
            self._discard(obj, old)
        if slot <= self._last:  # already due: fire on the next tick, never synchronously
            slot = self._last + 1
        bucket = self._slots.get(slot)
        if bucket is None:
            bucket = self._slots[slot] = set()
        bucket.add(obj)
        obj.wheel_slot = slot
        if self._handle is None:
            self._handle = self._loop.call_later(self._resolution, self._tick)

    def due(self, obj: Timed) -> float:
        """Latest time obj's current entry fires (inf when not scheduled)."""
        slot = obj.wheel_slot
        return slot * self._resolution if slot >= 0 else math.inf

    def cancel(self, obj: Timed) -> None:
        old = obj.wheel_slot
        if old >= 0:
            self._discard(obj, old)
            obj.wheel_slot = -1

    def _discard(self, obj: Timed, slot: int) -> None:
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.discard(obj)
            if not bucket:  # empty buckets are dropped so an idle wheel stops ticking
                del self._slots[slot]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        for bucket in self._slots.values():
            for obj in bucket:
                obj.wheel_slot = -1
        self._slots.clear()

    def _tick(self) -> None:
        self._handle = None
        now = self._loop.time()
        current = math.floor(now / self._resolution)
        slots = self._slots
        for slot in range(self._last + 1, current + 1):
            bucket = slots.pop(slot, None)
            if not bucket:
                continue
            for obj in bucket:
                obj.wheel_slot = -1
            for obj in bucket:
                # a callback may reschedule itself or others; those land in later slots
                if obj.wheel_slot == -1:
                    obj.on_deadline(now)
        self._last = max(self._last, current)
        if slots:
            self._handle = self._loop.call_later(self._resolution, self._tick)
