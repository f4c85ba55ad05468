"""Health checks: is an instance listening and answering, and when did that change.

Three layers, so the rules are tested with a fake clock and the I/O with real sockets:

- :class:`HealthTracker` is the logic, pure: it is told each probe's outcome and the time,
  and says when the instance became healthy or unhealthy and when to probe next. It reads
  no clock.
- :func:`probe` is one check: ``tcp`` opens a connection and closes it; ``http`` sends
  ``GET path`` and counts 2xx and 3xx as healthy (redirects are not followed: a 302 is an
  answer). Either must finish within the policy's ``timeout``. The result says why a check
  failed, for status and logs.
- :class:`HealthChecker` is the async shell: one task per watched instance that sleeps until
  the tracker's next probe time, probes, and reports changes to a callback. Its clock and
  sleep are injectable, so tests drive it without waiting.

The rules (the policy is the service file's ``health_check``, contract section 1):

- An instance becomes healthy after ``healthy_threshold`` successes in a row.
- Until it has been healthy once, it is probed every :data:`FAST_PROBE_INTERVAL` (10 ms)
  rather than every ``interval``, so it is ready within milliseconds of listening and a cold
  start costs the app's own start time, not up to an interval more. A refused connection on
  the loopback costs a few microseconds, so this is cheap. Never-healthy instances are not
  judged by ``unhealthy_threshold``: they get a start deadline (``health_check.start_timeout``,
  60 s by default) and :attr:`HealthChange.START_TIMEOUT` if they are not healthy by then.
- A TCP check passes when the connection is accepted *and stays open* for a settle time: a
  proxy in front of a port (Docker's userland proxy) accepts even when nothing listens, then
  closes. How fast it closes depends on how busy the host is (0.3 ms idle, up to 10 ms with
  the CPUs saturated), so the settle time is not a constant: :class:`CloseDelays` keeps the
  recent close delays and asks for ``SETTLE_FACTOR`` times the slowest, never less than
  ``TCP_SETTLE`` (for a load that has only just begun) nor more than ``TCP_SETTLE_MAX``. Only
  a passing probe waits the settle time out, so it costs a cold start once.
- Once it has been healthy, it is probed every ``interval`` and becomes unhealthy after
  ``unhealthy_threshold`` failures in a row; it can become healthy again the same way.
- Intervals run from the end of one probe to the start of the next, so at most one probe per
  instance is ever in flight, however slow the instance is to answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import aiohttp
import msgspec

from scaler.lifecycle import Event
from scaler.spec import HealthCheckSpec

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "FAST_PROBE_INTERVAL",
    "CloseDelays",
    "HealthChange",
    "HealthChecker",
    "HealthTracker",
    "ProbeFunction",
    "ProbeResult",
    "probe",
]

FAST_PROBE_INTERVAL = 0.010  # seconds between probes until first healthy (10 to 20 ms asked)
# Seconds an accepted probe connection must stay open, at least. A proxy in front of a port
# nobody listens on closes within a millisecond on an idle host, but with both CPUs busy 9%
# of its closes took over 2 ms and the slowest of 500 took 9.3 ms: a 2 ms wait let a
# never-listening app pass. The floor covers a load that starts between two probes; a
# sustained one raises the settle time through CloseDelays.
TCP_SETTLE = 0.010
TCP_SETTLE_MAX = 0.100  # the settle time's ceiling, also the most a cold start pays for it
SETTLE_FACTOR = 4.0  # settle time: this many times the slowest recent close
CLOSE_WINDOW = 64  # how many recent close delays count
DEFAULT_START_TIMEOUT = 60.0  # seconds an instance may take to become healthy the first time
_USER_AGENT = "tidegate-health-check"

_log = logging.getLogger(__name__)


class HealthChange(enum.Enum):
    """What a probe's outcome changed about an instance."""

    HEALTHY = "healthy"  # healthy_threshold successes in a row
    UNHEALTHY = "unhealthy"  # unhealthy_threshold failures in a row, after being healthy
    START_TIMEOUT = "start_timeout"  # not healthy by the start deadline; no more probes

    @property
    def event(self) -> Event:
        """The lifecycle event this change is for the instance."""
        return _EVENTS[self]


_EVENTS = {
    HealthChange.HEALTHY: Event.LISTENING_HEALTHY,
    HealthChange.UNHEALTHY: Event.UNHEALTHY,
    HealthChange.START_TIMEOUT: Event.START_FAILED,
}


class HealthTracker:
    """One instance's health, from its probes' outcomes. Pure: every time is passed in.

    ``now`` is when the instance started; the first probe is due at once, and the start
    deadline is ``now + start_timeout``.
    """

    def __init__(
        self, policy: HealthCheckSpec, now: float, *, start_timeout: float = DEFAULT_START_TIMEOUT
    ) -> None:
        self._policy = policy
        self._deadline = now + start_timeout
        self._next_probe = now
        self._successes = 0  # in a row
        self._failures = 0  # in a row
        self._healthy = False
        self._ever_healthy = False
        self._gave_up = False

    @property
    def healthy(self) -> bool:
        """Whether the last change was to healthy."""
        return self._healthy

    @property
    def gave_up(self) -> bool:
        """Whether the start deadline passed: no more probes, no more changes."""
        return self._gave_up

    def record(self, ok: bool, now: float) -> HealthChange | None:
        """Take one probe's outcome, finished at ``now``; the change it makes, if any."""
        if self._gave_up:
            return None
        self._next_probe = now + (
            self._policy.interval if self._ever_healthy else FAST_PROBE_INTERVAL
        )
        if ok:
            self._failures = 0
            self._successes += 1
            if not self._healthy and self._successes >= self._policy.healthy_threshold:
                self._healthy = self._ever_healthy = True
                self._next_probe = now + self._policy.interval
                return HealthChange.HEALTHY
        else:
            self._successes = 0
            self._failures += 1
            if self._healthy and self._failures >= self._policy.unhealthy_threshold:
                self._healthy = False
                return HealthChange.UNHEALTHY
        if not self._ever_healthy and now >= self._deadline:
            self._gave_up = True
            return HealthChange.START_TIMEOUT
        return None

    def next_probe_at(self, now: float) -> float:
        """When the next probe should start: never before ``now``; infinity once given up."""
        if self._gave_up:
            return math.inf
        return max(now, self._next_probe)


class CloseDelays:
    """The close delays of a proxy in front of ports nobody listens on, recently; and from
    them how long a TCP probe must hold an accepted connection before it believes that an app
    accepted it. Pure: it is told each delay."""

    def __init__(
        self,
        *,
        floor: float = TCP_SETTLE,
        ceiling: float = TCP_SETTLE_MAX,
        factor: float = SETTLE_FACTOR,
        window: int = CLOSE_WINDOW,
    ) -> None:
        if not 0 < floor <= ceiling:
            raise ValueError(f"need 0 < floor <= ceiling (got {floor}, {ceiling})")
        self._floor = floor
        self._ceiling = ceiling
        self._factor = factor
        self._delays: collections.deque[float] = collections.deque(maxlen=window)

    def record(self, delay: float) -> None:
        """A probe's accepted connection was closed by the peer ``delay`` seconds later."""
        self._delays.append(delay)

    def settle(self) -> float:
        """Seconds a probe should hold an accepted connection now."""
        slowest = max(self._delays, default=0.0)
        return min(self._ceiling, max(self._floor, self._factor * slowest))


class ProbeResult(msgspec.Struct, frozen=True):
    """One probe's outcome; ``detail`` says what was seen ("status 503", "connection refused").

    ``closed_after``: for a TCP probe whose accepted connection the peer closed within the
    settle time, how many seconds that took (a proxy's close delay, for :class:`CloseDelays`).
    """

    ok: bool
    detail: str
    closed_after: float | None = None


async def probe(
    address: str,
    policy: HealthCheckSpec,
    *,
    session: aiohttp.ClientSession | None = None,
    settle: float = TCP_SETTLE,
) -> ProbeResult:
    """Check the instance at ``address`` ("host:port") once, as ``policy`` says, within its
    timeout. ``session`` is used for http checks when given (one is made for the check when
    not); every check opens a new connection, so it proves the instance still accepts them.
    ``settle``: how long a tcp check holds an accepted connection (see :class:`CloseDelays`);
    at most half the timeout is used, so a held connection is never a timeout."""
    try:
        async with asyncio.timeout(policy.timeout):
            if policy.protocol == "http":
                return await _probe_http(address, policy.path, session)
            return await _probe_tcp(address, min(settle, policy.timeout / 2))
    except TimeoutError:
        return ProbeResult(False, f"timeout after {policy.timeout:g}s")
    except aiohttp.ClientConnectorError as exc:
        return ProbeResult(False, _os_error_detail(exc.os_error))
    except aiohttp.ServerDisconnectedError:
        return ProbeResult(False, "closed the connection without answering")
    except aiohttp.ClientError as exc:
        return ProbeResult(False, f"bad answer: {exc}")
    except OSError as exc:
        return ProbeResult(False, _os_error_detail(exc))


class _Held(asyncio.Protocol):
    """Notices the peer closing a connection it has just accepted."""

    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def eof_received(self) -> bool:
        if not self._closed.done():
            self._closed.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


async def _probe_tcp(address: str, settle: float) -> ProbeResult:
    host, port = _split_address(address)
    loop = asyncio.get_running_loop()
    closed: asyncio.Future[None] = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Held(closed), host, port)
    # time.monotonic, not loop.time(): uvloop's is a cached 1 ms tick, and closes take less
    accepted = time.monotonic()
    try:
        # An accepted connection does not prove the app listens: Docker's userland proxy
        # accepts on a published port, then closes when nothing answers inside the
        # container. A connection still open after the settle time is one the app holds.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(settle):
                await asyncio.shield(closed)
        # A close that came while this process was not running may be unread: uvloop runs
        # expired timers before it polls for I/O. Ask the socket itself.
        if not closed.done() and _peer_closed(transport):
            closed.set_result(None)
    finally:
        transport.close()
    if closed.done():
        return ProbeResult(
            False, "accepted a connection and closed it at once", time.monotonic() - accepted
        )
    return ProbeResult(True, "accepted a connection")


def _peer_closed(transport: asyncio.BaseTransport) -> bool:
    """Whether the peer has closed (or reset) the connection, from what the socket holds."""
    fd = transport.get_extra_info("socket").fileno()
    sock = socket.socket(fileno=fd)  # borrowed: detached below, never closed here
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False  # nothing to read: still open
    except OSError:
        return True  # reset
    finally:
        sock.detach()


async def _probe_http(
    address: str, path: str, session: aiohttp.ClientSession | None
) -> ProbeResult:
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await _probe_http(address, path, own)
    url = f"http://{address}{path}"
    # Connection: close: a pooled keep-alive connection would hide a listener that stopped
    # accepting, which is exactly what a health check is for.
    headers = {"Connection": "close", "User-Agent": _USER_AGENT}
    async with session.get(url, allow_redirects=False, headers=headers) as response:
        status = response.status
    return ProbeResult(200 <= status < 400, f"status {status}")


def _split_address(address: str) -> tuple[str, int]:
    """Split ``127.0.0.1:8080`` or ``[::1]:8080`` into host and port."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"health check address must be host:port (got {address!r})")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _os_error_detail(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return exc.strerror or str(exc) or type(exc).__name__


class ProbeFunction(Protocol):
    """The shape of :func:`probe`, so tests can give the checker a scripted one."""

    def __call__(
        self,
        address: str,
        policy: HealthCheckSpec,
        /,
        *,
        session: aiohttp.ClientSession | None,
        settle: float,
    ) -> Awaitable[ProbeResult]: ...


OnChange = Callable[[str, HealthChange, str], None]  # (instance_id, change, probe detail)


class HealthChecker:
    """Probes watched instances, one task each, and calls back when their health changes.

    ``clock`` and ``sleep`` default to the monotonic clock and :func:`asyncio.sleep`; tests
    pass fakes to drive time. ``session`` is used for http checks; without one the checker
    makes its own when first needed and closes it in :meth:`close`. After
    :data:`HealthChange.START_TIMEOUT` an instance is no longer watched. A callback that
    raises is logged and the instance stays watched.
    """

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        probe: ProbeFunction = probe,
        start_timeout: float | None = None,
    ) -> None:
        self._session = session
        self._own_session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._sleep = sleep
        self._probe = probe
        self._start_timeout = start_timeout
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = False
        # one for every instance: how fast a proxy closes depends on the host, not the app
        self._close_delays = CloseDelays()

    def watched(self) -> frozenset[str]:
        """The instance ids being probed now."""
        return frozenset(self._tasks)

    def watch(
        self, instance_id: str, address: str, policy: HealthCheckSpec, on_change: OnChange
    ) -> None:
        """Start probing an instance that has just started; the first probe is at once."""
        if self._closed:
            raise RuntimeError("HealthChecker is closed")
        if instance_id in self._tasks:
            raise ValueError(f"instance {instance_id} is already watched")
        start_timeout = self._start_timeout
        if start_timeout is None:
            start_timeout = policy.start_timeout
        tracker = HealthTracker(policy, self._clock(), start_timeout=start_timeout)
        self._tasks[instance_id] = asyncio.get_running_loop().create_task(
            self._run(instance_id, address, policy, on_change, tracker),
            name=f"health-check {instance_id}",
        )

    def unwatch(self, instance_id: str) -> None:
        """Stop probing an instance (unknown ids are ignored); its callback is not called again,
        even when this is called from inside it."""
        task = self._tasks.pop(instance_id, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        """Cancel every task, wait for them to end, and close the session made here."""
        self._closed = True
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None

    async def _run(
        self,
        instance_id: str,
        address: str,
        policy: HealthCheckSpec,
        on_change: OnChange,
        tracker: HealthTracker,
    ) -> None:
        task = asyncio.current_task()
        while True:
            now = self._clock()
            delay = tracker.next_probe_at(now) - now
            if delay > 0:
                await self._sleep(delay)
            result = await self._probe_once(address, policy)
            change = tracker.record(result.ok, self._clock())
            if change is None:
                continue
            try:
                on_change(instance_id, change, result.detail)
            except Exception:
                _log.exception("health check callback failed for %s (%s)", instance_id, change)
            if self._tasks.get(instance_id) is not task:
                return  # unwatched from inside the callback
            if tracker.gave_up:
                del self._tasks[instance_id]
                return

    async def _probe_once(self, address: str, policy: HealthCheckSpec) -> ProbeResult:
        session = self._session
        if session is None and policy.protocol == "http":
            if self._own_session is None:
                self._own_session = aiohttp.ClientSession()
            session = self._own_session
        try:
            result = await self._probe(
                address, policy, session=session, settle=self._close_delays.settle()
            )
        except Exception as exc:  # a bad address, a bug: a failed check, never a dead task
            _log.exception("health check of %s raised", address)
            return ProbeResult(False, f"probe error: {exc!r}")
        if result.closed_after is not None:
            self._close_delays.record(result.closed_after)
        return result
