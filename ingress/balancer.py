"""Per-service load balancing and request holding for the ingress.

One :class:`ServiceBalancer` per service decides which instance takes each request. It is
pure bookkeeping (no I/O, no event loop, ``now`` is passed in), called synchronously on the
hot path between taking a request and forwarding it. Its rules:

- **Exact in-flight counts.** Every acquire or grant takes one slot, matched by exactly one
  release. Draining and removed instances are kept until their count reaches zero, so stats
  and the scaler's "drained" signal are exact.
- **Never more than max_concurrency** in flight on one instance (contract section 3). Lowering
  the limit cancels nothing: a busy instance just gets nothing new until it is below.
- **Least outstanding requests, ties rotated.** Ready instances sit in an indexed binary
  min-heap keyed by (in-flight, sequence number of the last choice): the least loaded wins
  and, among equals, the least recently chosen, so round robin falls out of the key.
  acquire and release are O(log n) and never scan the instances.
- **FIFO holding.** Requests are held, in one bounded queue, only while no ready instance has
  a free slot; freed or new capacity goes to the oldest at once, and no request jumps it.
- **Ejection.** An instance that just failed a request before answering (refused, reset)
  is taken out of the rotation for a moment (:meth:`ServiceBalancer.eject`): a dead one
  fails fast, so least-outstanding would otherwise send it every new request until the
  scaler's update arrives. It comes back by itself when the moment ends (:meth:`expire`)
  or when the scaler lists it again as ready after a drain.
- **Re-entrancy.** Callbacks (``Waiter.grant``, ``on_drained``) run once the balancer's own
  state is consistent and may call back into it; one loop issues grants, never recursion, so
  thousands of waiters whose clients left cannot blow the stack.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

READY = "ready"
DRAINING = "draining"
REMOVED = "removed"

# An instance's life as data: a removed instance never comes back (the same id reappearing
# is a new Instance, so a late release can never be counted against the wrong one).
_TRANSITIONS: dict[str, frozenset[str]] = {
    READY: frozenset({DRAINING, REMOVED}),
    DRAINING: frozenset({READY, REMOVED}),
    REMOVED: frozenset(),
}

# Dead (cancelled) entries tolerated in the queue before it is compacted; below this the
# rebuild is not worth it, above it (and above the live count) it keeps memory bounded by
# the live requests while each cancel stays amortized O(1).
_COMPACT_MIN_DEAD = 64


class Instance:
    """One upstream instance; the proxy reads the public attributes directly."""

    __slots__ = (
        "_drain_reported",
        "_ejected_until",
        "_owner",
        "_pos",
        "_seq",
        "address",
        "id",
        "inflight",
        "state",
    )

    def __init__(self, id: str, address: tuple[str, int], state: str, seq: int = 0) -> None:
        self.id = id
        self.address = address  # (host, port)
        self.state = state  # "ready" | "draining" | "removed"
        self.inflight = 0
        self._seq = seq  # when last chosen: the tie-breaker that rotates equals
        self._pos = -1  # index in the ready heap, -1 when not ready
        self._owner: ServiceBalancer | None = None  # None once forgotten
        self._drain_reported = False  # on_drained already called for this drain
        self._ejected_until = 0.0  # > 0: ready but out of the rotation until then

    def __repr__(self) -> str:
        return f"Instance({self.id!r}, {self.state}, inflight={self.inflight})"


class Waiter(Protocol):
    """The proxy's side of a held request."""

    def grant(self, instance: Instance) -> None:
        """Called synchronously with a slot already taken on ``instance``.

        May re-enter the balancer (e.g. release at once because the client left). Must not
        raise: the slot is already counted and only a release gives it back.
        """


class HeldRequest:
    """Token for a held request, returned by :meth:`ServiceBalancer.hold`."""

    __slots__ = ("_pending", "arrived", "deadline", "waiter")

    def __init__(self, waiter: Waiter, arrived: float, deadline: float) -> None:
        self.waiter = waiter
        self.arrived = arrived  # the ``now`` given to hold(): queue wait = grant time - this
        self.deadline = deadline  # arrived + queue_timeout
        self._pending = True  # False once granted, expired, cancelled or closed


def _before(a: Instance, b: Instance) -> bool:
    """Heap order: fewer in flight first, then the least recently chosen."""
    return a.inflight < b.inflight or (a.inflight == b.inflight and a._seq < b._seq)


class ServiceBalancer:
    """Chooses instances for one service's requests and holds those that must wait."""

    __slots__ = (
        "_arrivals",
        "_by_id",
        "_closed",
        "_completions",
        "_dead",
        "_dispatching",
        "_ejected",
        "_heap",
        "_inflight",
        "_known",
        "_max",
        "_on_drained",
        "_queue",
        "_queue_max",
        "_queue_timeout",
        "_queued",
        "_seq",
        "name",
    )

    def __init__(
        self,
        name: str,
        *,
        max_concurrency: int | None,
        queue_max_length: int,
        queue_timeout: float,
        on_drained: Callable[[Instance], None] | None = None,
    ) -> None:
        self.name = name
        self._on_drained = on_drained
        self._heap: list[Instance] = []  # ready instances only, ejected ones excepted
        self._ejected: list[Instance] = []  # ready but out of the rotation for a moment
        self._by_id: dict[str, Instance] = {}  # current (ready or draining) instances
        self._known: dict[Instance, None] = {}  # ordered set: current plus removed-but-busy
        self._queue: deque[HeldRequest] = deque()  # head is always pending (or queue empty)
        self._queued = 0  # pending entries in _queue
        self._dead = 0  # cancelled entries still in _queue
        self._seq = 0
        self._inflight = 0
        self._arrivals = 0
        self._completions = 0
        self._dispatching = False
        self._closed = False
        self._max: int | None = None
        self._queue_max = 0
        self._queue_timeout = 0.0
        self.update_limits(
            max_concurrency=max_concurrency,
            queue_max_length=queue_max_length,
            queue_timeout=queue_timeout,
        )

    # -- stats (cheap and exact) ------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests held right now."""
        return self._queued

    @property
    def inflight(self) -> int:
        """Slots taken over all instances, kept as a running total."""
        return self._inflight

    @property
    def arrivals(self) -> int:
        """Requests received: one per acquire() call, which every request makes exactly once
        before any hold(), so held, granted and rejected requests all count once."""
        return self._arrivals

    @property
    def completions(self) -> int:
        """Requests finished: one per release() call."""
        return self._completions

    @property
    def ready_count(self) -> int:
        return len(self._heap)

    def instances(self) -> list[Instance]:
        """Every known instance, draining and removed-but-busy ones included (a copy)."""
        return list(self._known)

    def can_serve_now(self) -> bool:
        """Whether some ready instance has a free slot (the heap top is the least loaded)."""
        heap = self._heap
        return bool(heap) and (self._max is None or heap[0].inflight < self._max)

    def next_deadline(self) -> float | None:
        """Earliest deadline among held requests (the head's: FIFO is deadline order) and the
        ends of ejections."""
        deadline = self._queue[0].deadline if self._queue else None
        for instance in self._ejected:
            if deadline is None or instance._ejected_until < deadline:
                deadline = instance._ejected_until
        return deadline

    # -- configuration ----------------------------------------------------------------------

    def update_limits(
        self, *, max_concurrency: int | None, queue_max_length: int, queue_timeout: float
    ) -> None:
        """Apply new routing limits; new capacity goes to held requests at once.

        A changed timeout applies to requests already held, counted from their arrival, so
        deadlines stay in FIFO order (the queue is rebuilt only on such a change: rare).
        Lowering ``queue_max_length`` below the current count keeps those held.
        """
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None (got {max_concurrency})")
        if queue_max_length < 0:
            raise ValueError(f"queue_max_length must be >= 0 (got {queue_max_length})")
        if queue_timeout < 0:
            raise ValueError(f"queue_timeout must be >= 0 (got {queue_timeout})")
        self._max = max_concurrency
        self._queue_max = queue_max_length
        if queue_timeout != self._queue_timeout:
            self._queue_timeout = queue_timeout
            for held in self._queue:
                held.deadline = held.arrived + queue_timeout
        self._dispatch()

    def set_instances(self, instances: Iterable[tuple[str, tuple[str, int], str]]) -> None:
        """Make (id, address, state) the full list of instances; see the module rules.

        The whole list is validated before anything changes. An id whose address changed is
        a replacement: the old Instance is removed and a new one added.
        """
        if self._closed:
            raise RuntimeError(f"service {self.name!r} is closed")
        wanted: dict[str, tuple[tuple[str, int], str]] = {}
        for instance_id, address, state in instances:
            if state not in (READY, DRAINING):
                raise ValueError(
                    f"instance {instance_id!r}: state must be ready or draining, got {state!r}"
                )
            if instance_id in wanted:
                raise ValueError(f"instance {instance_id!r} listed twice")
            wanted[instance_id] = (address, state)

        self._apply(wanted)

    # -- the request path -------------------------------------------------------------------

    def acquire(self) -> Instance | None:
        """Take a slot on the least loaded ready instance, or None if the request must wait.

        None also while requests are held, so a new request never overtakes them.
        """
        self._arrivals += 1
        if self._queued:
            return None
        heap = self._heap
        if not heap:
            return None
        instance = heap[0]
        if self._max is not None and instance.inflight >= self._max:
            return None
        self._take(instance)
        return instance

    def release(self, instance: Instance) -> None:
        """Give back one slot on ``instance``; the freed slot goes to the oldest held request."""
        if instance._owner is not self:
            raise ValueError(f"{instance!r} is not an instance of service {self.name!r}")
        if instance.inflight <= 0:
            raise ValueError(f"{instance!r} released more often than acquired")
        instance.inflight -= 1
        self._inflight -= 1
        self._completions += 1
        if instance._pos >= 0:
            self._sift_up(instance._pos)
            if self._queued:
                # Every other ready instance is full (module invariant), so the heap top is
                # this one and the oldest held request gets exactly the slot just freed.
                self._dispatch()
        elif instance.inflight == 0 and instance.state != READY:  # READY here: ejected
            drained: list[Instance] = []
            self._note_idle(instance, drained)
            self._report(drained)

    def hold(self, waiter: Waiter, now: float) -> HeldRequest | None:
        """Queue a request that acquire() refused, with deadline now + queue_timeout.

        None when the queue is full or the service is closed (the caller answers 503). If a
        slot happens to be free the request is granted before this returns.
        """
        if self._closed or self._queued >= self._queue_max:
            return None
        held = HeldRequest(waiter, now, now + self._queue_timeout)
        self._queue.append(held)
        self._queued += 1
        # Keeps the invariant even for a caller that did not try acquire() first.
        self._dispatch()
        return held

    def cancel(self, held: HeldRequest) -> None:
        """Drop a held request whose client left; a no-op if it is no longer held.

        Lazy deletion: the entry is marked and skipped later, so this is O(1) amortized.
        """
        if not held._pending:
            return
        held._pending = False
        self._queued -= 1
        self._dead += 1
        self._trim_head()
        if self._dead > _COMPACT_MIN_DEAD and self._dead > self._queued:
            self._queue = deque(h for h in self._queue if h._pending)
            self._dead = 0

    def eject(self, instance: Instance, until: float) -> bool:
        """Take a ready instance out of the rotation until ``until`` (its in-flight requests
        go on); False if it is not ready in this service, or already out."""
        if instance._owner is not self or instance.state != READY or instance._pos < 0:
            return False
        self._heap_remove(instance)
        instance._ejected_until = until
        self._ejected.append(instance)
        return True

    def expire(self, now: float) -> list[Waiter]:
        """Put back ejected instances whose time is up; remove and return, oldest first, the
        held requests whose deadline is <= now."""
        if self._ejected:
            self._readmit(now)
        expired: list[Waiter] = []
        queue = self._queue
        while queue and queue[0].deadline <= now:
            expired.append(self._pop_head().waiter)
        return expired

    def close(self) -> list[Waiter]:
        """The service is deleted: every instance is removed (in-flight requests still finish
        and are released), no request is taken or held again, and every held waiter is
        returned, oldest first, for the caller to answer.
        """
        if not self._closed:
            self._closed = True
            self._apply({})
        waiters = [held.waiter for held in self._queue if held._pending]
        for held in self._queue:
            held._pending = False
        self._queue.clear()
        self._queued = 0
        self._dead = 0
        return waiters

    # -- internals --------------------------------------------------------------------------

    def _apply(self, wanted: dict[str, tuple[tuple[str, int], str]]) -> None:
        drained: list[Instance] = []
        for instance_id, old in list(self._by_id.items()):
            if instance_id not in wanted or wanted[instance_id][0] != old.address:
                del self._by_id[instance_id]  # gone, or a new address: a replacement
                self._transition(old, REMOVED)
                self._note_idle(old, drained)
        for instance_id, (address, state) in wanted.items():
            current = self._by_id.get(instance_id)
            if current is None:
                self._seq += 1  # a newcomer goes last among equals in the rotation
                current = Instance(instance_id, address, state, self._seq)
                current._owner = self
                self._by_id[instance_id] = current
                self._known[current] = None
                if state == READY:
                    self._heap_push(current)
            elif state != current.state:
                self._transition(current, state)
            if state == DRAINING:
                self._note_idle(current, drained)
        # State is complete: now the callbacks, which may re-enter.
        self._dispatch()
        self._report(drained)

    def _readmit(self, now: float) -> None:
        back = [i for i in self._ejected if i._ejected_until <= now]
        if not back:
            return
        self._ejected = [i for i in self._ejected if i._ejected_until > now]
        for instance in back:
            instance._ejected_until = 0.0
            if instance.state == READY and instance._owner is self:
                self._heap_push(instance)
        self._dispatch()

    def _take(self, instance: Instance) -> None:
        instance.inflight += 1
        self._inflight += 1
        self._seq += 1
        instance._seq = self._seq
        self._sift_down(instance._pos)

    def _dispatch(self) -> None:
        """Grant held requests, oldest first, while some ready instance has a free slot."""
        if self._dispatching:
            # Re-entered from a grant: the loop below is still running and will see the
            # capacity this call was about to hand out.
            return
        self._dispatching = True
        try:
            while self._queued and self.can_serve_now():
                held = self._pop_head()
                instance = self._heap[0]
                self._take(instance)
                held.waiter.grant(instance)
        finally:
            self._dispatching = False

    def _pop_head(self) -> HeldRequest:
        held = self._queue.popleft()
        held._pending = False
        self._queued -= 1
        self._trim_head()
        return held

    def _trim_head(self) -> None:
        queue = self._queue
        while queue and not queue[0]._pending:
            queue.popleft()
            self._dead -= 1

    def _transition(self, instance: Instance, state: str) -> None:
        if state not in _TRANSITIONS[instance.state]:
            raise RuntimeError(f"{instance!r}: illegal transition to {state}")
        if instance._ejected_until:  # leaving ready ends the ejection
            instance._ejected_until = 0.0
            self._ejected.remove(instance)
        elif instance.state == READY:
            self._heap_remove(instance)
        instance.state = state
        if state == READY:
            instance._drain_reported = False
            self._heap_push(instance)

    def _note_idle(self, instance: Instance, drained: list[Instance]) -> None:
        """Record a non-ready instance at zero in flight: report its drain once, and forget
        it if removed. Callers call on_drained (via _report) once their state is complete.
        """
        if instance.inflight:
            return
        if not instance._drain_reported:
            instance._drain_reported = True
            drained.append(instance)
        if instance.state == REMOVED:
            del self._known[instance]
            instance._owner = None

    def _report(self, drained: list[Instance]) -> None:
        if self._on_drained is not None:
            for instance in drained:
                self._on_drained(instance)

    def _heap_push(self, instance: Instance) -> None:
        self._heap.append(instance)
        self._sift_up(len(self._heap) - 1)

    def _heap_remove(self, instance: Instance) -> None:
        heap = self._heap
        pos = instance._pos
        last = heap.pop()
        instance._pos = -1
        if last is not instance:
            heap[pos] = last
            last._pos = pos
            self._sift_down(pos)
            self._sift_up(last._pos)

    def _sift_up(self, pos: int) -> None:
        heap = self._heap
        item = heap[pos]
        while pos > 0:
            parent_pos = (pos - 1) >> 1
            parent = heap[parent_pos]
            if not _before(item, parent):
                break
            heap[pos] = parent
            parent._pos = pos
            pos = parent_pos
        heap[pos] = item
        item._pos = pos

    def _sift_down(self, pos: int) -> None:
        heap = self._heap
        size = len(heap)
        item = heap[pos]
        while True:
            child = 2 * pos + 1
            if child >= size:
                break
            right = child + 1
            if right < size and _before(heap[right], heap[child]):
                child = right
            smaller = heap[child]
            if not _before(smaller, item):
                break
            heap[pos] = smaller
            smaller._pos = pos
            pos = child
        heap[pos] = item
        item._pos = pos
