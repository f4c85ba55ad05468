"""Health checks: the tracker's rules on a fake clock, probes against real local servers, and the
checker's task driven by a fake clock and end to end on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from scaler.health import (
    DEFAULT_START_TIMEOUT,
    FAST_PROBE_INTERVAL,
    TCP_SETTLE,
    TCP_SETTLE_MAX,
    CloseDelays,
    HealthChange,
    HealthChecker,
    HealthTracker,
    ProbeResult,
    _peer_closed,
    probe,
)
from scaler.lifecycle import Event
from scaler.spec import HealthCheckSpec

T0 = 1000.0  # the fake monotonic clock's start
HEALTHY = HealthChange.HEALTHY
UNHEALTHY = HealthChange.UNHEALTHY
START_TIMEOUT = HealthChange.START_TIMEOUT
READY_BOUND = 0.2  # seconds from listening to the HEALTHY callback; ~10 ms expected


def policy(**fields: object) -> HealthCheckSpec:
    return HealthCheckSpec(**fields)  # type: ignore[arg-type]


# --- HealthTracker: the rules, on a fake clock -------------------------------------------------


def run_tracker(
    spec: HealthCheckSpec, outcomes: str, *, took: float = 0.001, start_timeout: float = 60.0
) -> list[tuple[int, HealthChange]]:
    """Feed outcomes ("s" success, "f" failure) at the times the tracker asks for, each probe
    taking ``took`` seconds; the changes, by the index of the probe that made them."""
    tracker = HealthTracker(spec, T0, start_timeout=start_timeout)
    now = T0
    changes = []
    for i, outcome in enumerate(outcomes):
        now = tracker.next_probe_at(now) + took
        change = tracker.record(outcome == "s", now)
        if change is not None:
            changes.append((i, change))
    return changes


@pytest.mark.parametrize(
    ("thresholds", "outcomes", "expected"),
    [
        pytest.param((1, 5), "s", [(0, HEALTHY)], id="first-success-is-healthy"),
        pytest.param((1, 5), "fffs", [(3, HEALTHY)], id="refused-then-listening"),
        pytest.param((3, 5), "ssfsss", [(5, HEALTHY)], id="a-failure-resets-the-successes"),
        pytest.param((1, 3), "sfff", [(0, HEALTHY), (3, UNHEALTHY)], id="unhealthy-at-threshold"),
        pytest.param((1, 3), "sffsff", [(0, HEALTHY)], id="a-success-resets-the-failures"),
        pytest.param((1, 1), "sfffff", [(0, HEALTHY), (1, UNHEALTHY)], id="unhealthy-only-once"),
        pytest.param((2, 2), "ssffss", [(1, HEALTHY), (3, UNHEALTHY), (5, HEALTHY)], id="recovers"),
        pytest.param((2, 2), "ssfsfsfsfs", [(1, HEALTHY)], id="flapping-never-crosses"),
        pytest.param(
            (1, 1),
            "sfsfs",
            [(0, HEALTHY), (1, UNHEALTHY), (2, HEALTHY), (3, UNHEALTHY), (4, HEALTHY)],
            id="flapping-at-threshold-one-reports-each",
        ),
        pytest.param((1, 1), "ffffff", [], id="never-healthy-is-never-unhealthy"),
    ],
)
def test_tracker_thresholds(
    thresholds: tuple[int, int], outcomes: str, expected: list[tuple[int, HealthChange]]
) -> None:
    """Changes come exactly when healthy_threshold or unhealthy_threshold is met in a row."""
    healthy, unhealthy = thresholds
    spec = policy(healthy_threshold=healthy, unhealthy_threshold=unhealthy)
    assert run_tracker(spec, outcomes) == expected


def test_tracker_probes_fast_until_healthy_then_every_interval() -> None:
    """Before the first healthy change probes are 10 ms apart; after it, `interval` apart."""
    tracker = HealthTracker(policy(interval=5.0, healthy_threshold=2), T0)
    assert tracker.next_probe_at(T0) == T0  # the first probe is due at once
    assert tracker.record(False, T0 + 0.001) is None
    assert tracker.next_probe_at(T0 + 0.001) == pytest.approx(T0 + 0.001 + FAST_PROBE_INTERVAL)
    assert tracker.record(True, T0 + 0.020) is None  # one success of two: still fast
    assert tracker.next_probe_at(T0 + 0.020) == pytest.approx(T0 + 0.020 + FAST_PROBE_INTERVAL)
    assert tracker.record(True, T0 + 0.040) is HEALTHY
    assert tracker.healthy
    assert tracker.next_probe_at(T0 + 0.040) == pytest.approx(T0 + 5.040)
    assert tracker.record(False, T0 + 5.041) is None
    assert tracker.next_probe_at(T0 + 5.041) == pytest.approx(T0 + 10.041)  # interval, not fast


def test_tracker_interval_runs_from_the_end_of_a_slow_probe() -> None:
    """A probe that took 2 s is followed by the next one `interval` after it finished."""
    tracker = HealthTracker(policy(interval=5.0), T0)
    tracker.record(True, T0 + 0.001)
    tracker.record(False, T0 + 5.001 + 2.0)
    assert tracker.next_probe_at(T0 + 7.001) == pytest.approx(T0 + 12.001)


def test_tracker_next_probe_is_never_in_the_past() -> None:
    """Asked late, the tracker says "now" rather than a time already gone."""
    tracker = HealthTracker(policy(interval=5.0), T0)
    tracker.record(True, T0)
    assert tracker.next_probe_at(T0 + 60.0) == T0 + 60.0


def test_tracker_start_timeout() -> None:
    """A never-healthy instance gets START_TIMEOUT at its first probe past the deadline, then
    no more probes and no more changes."""
    tracker = HealthTracker(policy(), T0, start_timeout=1.0)
    now = T0
    while now < T0 + 1.0:
        now = tracker.next_probe_at(now) + 0.001
        change = tracker.record(False, now)
        if now < T0 + 1.0:
            assert change is None
    assert change is START_TIMEOUT
    assert tracker.gave_up
    assert tracker.next_probe_at(now) == math.inf
    assert tracker.record(True, now + 1.0) is None


def test_tracker_start_timeout_defaults_to_60_seconds() -> None:
    """Without start_timeout the deadline is 60 s after the start."""
    assert DEFAULT_START_TIMEOUT == 60.0
    tracker = HealthTracker(policy(), T0)
    assert tracker.record(False, T0 + 59.999) is None
    assert tracker.record(False, T0 + 60.0) is START_TIMEOUT


def test_tracker_success_at_the_deadline_wins() -> None:
    """A probe that succeeds as the deadline passes makes the instance healthy, not timed out."""
    tracker = HealthTracker(policy(), T0, start_timeout=1.0)
    assert tracker.record(True, T0 + 1.5) is HEALTHY


def test_tracker_below_threshold_at_the_deadline_times_out() -> None:
    """Successes short of healthy_threshold when the deadline passes still time out."""
    tracker = HealthTracker(policy(healthy_threshold=3), T0, start_timeout=1.0)
    assert tracker.record(True, T0 + 0.5) is None
    assert tracker.record(True, T0 + 1.0) is START_TIMEOUT


def test_tracker_start_deadline_ends_once_healthy() -> None:
    """After the first healthy change, failures long past the deadline give UNHEALTHY only."""
    spec = policy(interval=5.0, unhealthy_threshold=2)
    assert run_tracker(spec, "s" + "f" * 40, took=0.5, start_timeout=1.0) == [
        (0, HEALTHY),
        (2, UNHEALTHY),
    ]


@pytest.mark.parametrize(
    ("change", "event"),
    [
        pytest.param(HEALTHY, Event.LISTENING_HEALTHY, id="healthy"),
        pytest.param(UNHEALTHY, Event.UNHEALTHY, id="unhealthy"),
        pytest.param(START_TIMEOUT, Event.START_FAILED, id="start-timeout"),
    ],
)
def test_change_maps_to_lifecycle_event(change: HealthChange, event: Event) -> None:
    """Each health change names the lifecycle event the scaler feeds to transition()."""
    assert change.event is event


# --- probe(): real local servers ---------------------------------------------------------------


@contextlib.contextmanager
def bound_not_listening() -> Iterator[socket.socket]:
    """A port of our own that refuses connections until the test calls listen() on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield sock
    finally:
        sock.close()


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


@dataclass
class HttpApp:
    address: str = ""
    hits: Counter[str] = field(default_factory=Counter)
    connection_headers: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


HTTP_APP = web.AppKey("http_app", HttpApp)


async def _handle(request: web.Request) -> web.StreamResponse:
    app = request.app[HTTP_APP]
    app.hits[request.path] += 1
    app.connection_headers.append(request.headers.get("Connection", ""))
    if request.path == "/ok":
        return web.Response(text="ok")
    if request.path == "/down":
        return web.Response(status=503, text="starting")
    if request.path == "/moved":
        raise web.HTTPFound("/down")
    if request.path == "/slow":
        await app.release.wait()
        return web.Response(text="late")
    return web.Response(status=404)


async def start_http_app(app: HttpApp, sock: socket.socket | None = None) -> web.AppRunner:
    """Serve the app on `sock` (listen() is called on it) or on a fresh 127.0.0.1:0."""
    web_app = web.Application()
    web_app[HTTP_APP] = app
    web_app.router.add_route("GET", "/{tail:.*}", _handle)
    runner = web.AppRunner(web_app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0) if sock is None else web.SockSite(runner, sock)
    await site.start()
    host, port = runner.addresses[0][:2]
    app.address = f"{host}:{port}"
    return runner


@contextlib.asynccontextmanager
async def http_app() -> AsyncIterator[HttpApp]:
    app = HttpApp()
    runner = await start_http_app(app)
    try:
        yield app
    finally:
        app.release.set()
        await runner.cleanup()


@pytest.mark.both_loops
async def test_tcp_probe_listening() -> None:
    """A TCP check passes against a listener, and leaves no connection behind."""
    accepted = asyncio.Event()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b""  # the probe sends nothing and closes
        writer.close()
        accepted.set()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    async with server:
        result = await probe(address_of(server.sockets[0]), policy(protocol="tcp"), session=None)
        assert result == ProbeResult(True, "accepted a connection")
        await asyncio.wait_for(accepted.wait(), 5)


@pytest.mark.both_loops
async def test_tcp_probe_fails_when_the_connection_is_closed_at_once() -> None:
    """What Docker's userland proxy does on a published port with nothing listening behind
    it: accept, then close. That is not a healthy instance."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    async with server:
        result = await probe(address_of(server.sockets[0]), policy(protocol="tcp"), session=None)
    assert (result.ok, result.detail) == (False, "accepted a connection and closed it at once")
    assert result.closed_after is not None and 0 <= result.closed_after < TCP_SETTLE


@pytest.mark.both_loops
async def test_tcp_probe_waits_the_settle_time_for_a_slow_close() -> None:
    """A proxy that takes 5 ms to close is caught by a probe told to hold for much longer,
    and the probe says how long the close took."""
    close_after = 0.005

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.get_running_loop().call_later(close_after, writer.close)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    async with server:
        spec = policy(protocol="tcp", timeout=2.0)
        result = await probe(address_of(server.sockets[0]), spec, session=None, settle=0.5)
    assert (result.ok, result.detail) == (False, "accepted a connection and closed it at once")
    # about 5 ms: uvloop's timers run on a 1 ms tick, so the server's close may come early
    assert result.closed_after is not None and close_after / 2 <= result.closed_after < 0.5


@pytest.mark.both_loops
async def test_a_close_the_loop_has_not_read_yet_is_seen() -> None:
    """uvloop runs expired timers before it polls: when the settle time ran out while the
    process was not running, a close already in the socket must still count."""
    loop = asyncio.get_running_loop()
    with bound_not_listening() as listener:
        listener.listen(1)
        host, port = listener.getsockname()
        quiet, _ = await loop.create_connection(asyncio.Protocol, host, port)
        speaking, _ = await loop.create_connection(asyncio.Protocol, host, port)
        try:
            quiet_peer, _ = listener.accept()
            speaking_peer, _ = listener.accept()
            speaking_peer.sendall(b"banner")
            assert not _peer_closed(quiet)  # open, nothing sent
            assert not _peer_closed(speaking)  # an app that speaks first is open too
            quiet_peer.close()
            # no await between the close and the check: the loop has not seen it
            assert _peer_closed(quiet) and not quiet.is_closing()
            speaking_peer.close()
        finally:
            quiet.close()
            speaking.close()


@pytest.mark.both_loops
async def test_tcp_probe_holds_at_most_half_the_timeout() -> None:
    """A settle time longer than the check's timeout would make every check a timeout."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    async with server:
        spec = policy(protocol="tcp", timeout=0.05)
        result = await probe(address_of(server.sockets[0]), spec, session=None, settle=10.0)
    assert result == ProbeResult(True, "accepted a connection")


# --- CloseDelays: the settle time, pure -------------------------------------------------------


def test_settle_is_the_floor_until_a_close_is_seen() -> None:
    assert CloseDelays().settle() == TCP_SETTLE


@pytest.mark.parametrize(
    ("delays", "expected"),
    [
        pytest.param([0.0003, 0.0005], 0.010, id="fast-closes-keep-the-floor"),
        pytest.param([0.0003, 0.006, 0.001], 0.024, id="four-times-the-slowest"),
        pytest.param([0.2], 0.100, id="never-above-the-ceiling"),
    ],
)
def test_settle_follows_the_slowest_recent_close(delays: list[float], expected: float) -> None:
    closes = CloseDelays(floor=0.010, ceiling=0.100, factor=4)
    for delay in delays:
        closes.record(delay)
    assert closes.settle() == pytest.approx(expected)


def test_settle_forgets_closes_outside_the_window() -> None:
    closes = CloseDelays(floor=0.001, factor=2, window=3)
    closes.record(0.02)
    for _ in range(2):
        closes.record(0.001)
    assert closes.settle() == pytest.approx(0.04)
    closes.record(0.001)  # the slow one is now four closes back
    assert closes.settle() == pytest.approx(0.002)


def test_settle_rejects_a_floor_above_the_ceiling() -> None:
    with pytest.raises(ValueError, match="floor <= ceiling"):
        CloseDelays(floor=0.2, ceiling=TCP_SETTLE_MAX)


@pytest.mark.both_loops
@pytest.mark.parametrize("protocol", [pytest.param("tcp"), pytest.param("http")])
async def test_probe_closed_port_is_refused(protocol: str) -> None:
    """A port nobody listens on fails at once with "connection refused"."""
    with bound_not_listening() as sock:
        result = await probe(address_of(sock), policy(protocol=protocol), session=None)
    assert result == ProbeResult(False, "connection refused")


@pytest.mark.both_loops
@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs at backlog")
async def test_tcp_probe_times_out() -> None:
    """A listener whose accept queue is full never completes the handshake: a timeout."""
    with bound_not_listening() as sock:
        sock.listen(0)
        spec = policy(protocol="tcp", interval=1.0, timeout=0.1)
        first = await probe(address_of(sock), spec, session=None)  # fills the queue of one
        assert first.ok
        assert await probe(address_of(sock), spec, session=None) == ProbeResult(
            False, "timeout after 0.1s"
        )


@pytest.mark.both_loops
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/ok", ProbeResult(True, "status 200"), id="200"),
        pytest.param("/down", ProbeResult(False, "status 503"), id="503"),
        pytest.param("/missing", ProbeResult(False, "status 404"), id="404"),
        pytest.param("/moved", ProbeResult(True, "status 302"), id="302-not-followed"),
    ],
)
@pytest.mark.parametrize("own_session", [pytest.param(True, id="session"), pytest.param(False)])
async def test_http_probe_status(path: str, expected: ProbeResult, own_session: bool) -> None:
    """2xx and 3xx pass and others fail, redirects unfollowed, each on a new connection."""
    async with http_app() as app:
        if own_session:
            async with aiohttp.ClientSession() as session:
                result = await probe(
                    app.address, policy(protocol="http", path=path), session=session
                )
        else:
            result = await probe(app.address, policy(protocol="http", path=path), session=None)
    assert result == expected
    assert app.hits == Counter({path: 1})  # the 302's target (/down) was never asked for
    assert app.connection_headers == ["close"]


@pytest.mark.both_loops
async def test_http_probe_times_out() -> None:
    """An answer slower than the timeout fails with "timeout after ..."."""
    async with http_app() as app:
        spec = policy(protocol="http", path="/slow", interval=1.0, timeout=0.1)
        assert await probe(app.address, spec, session=None) == ProbeResult(
            False, "timeout after 0.1s"
        )
        assert app.hits["/slow"] == 1


@pytest.mark.both_loops
async def test_http_probe_connection_closed_without_answer() -> None:
    """A server that accepts and closes without answering fails the http check, saying so."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    async with server:
        result = await probe(address_of(server.sockets[0]), policy(protocol="http"), session=None)
    assert result == ProbeResult(False, "closed the connection without answering")


async def test_probe_rejects_an_address_without_port() -> None:
    """An address that is not host:port is a caller's bug and raises ValueError."""
    with pytest.raises(ValueError, match="host:port"):
        await probe("localhost", policy(), session=None)


# --- HealthChecker: its task on a fake clock ---------------------------------------------------


class FakeTime:
    """A monotonic clock that moves only when the checker sleeps or a scripted probe runs."""

    def __init__(self) -> None:
        self.now = T0
        self.sleeps: list[float] = []
        self.gate: asyncio.Event | None = None  # when set: sleeping waits for it
        self.sleeping = asyncio.Event()  # set when a sleep starts waiting on the gate

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.sleeps.append(delay)
        if self.gate is not None:
            self.sleeping.set()
            await self.gate.wait()
        self.now += delay
        await asyncio.sleep(0)  # yield, as a real sleep would


class ScriptedProbe:
    """A probe that announces each call (its start time) and waits for the test's answer."""

    def __init__(self, time: FakeTime) -> None:
        self.time = time
        self.calls: asyncio.Queue[float] = asyncio.Queue()
        self.answers: asyncio.Queue[tuple[bool, float] | Exception] = asyncio.Queue()
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(
        self,
        address: str,
        spec: HealthCheckSpec,
        *,
        session: aiohttp.ClientSession | None,
        settle: float,
    ) -> ProbeResult:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.calls.put_nowait(self.time.now)
            answer = await self.answers.get()
            if isinstance(answer, Exception):
                raise answer
            ok, took = answer
            self.time.now += took
            return ProbeResult(ok, "fine" if ok else "connection refused")
        finally:
            self.in_flight -= 1

    async def next_call(self) -> float:
        return await asyncio.wait_for(self.calls.get(), 5)

    def answer(self, ok: bool, took: float = 0.001) -> None:
        self.answers.put_nowait((ok, took))


Change = tuple[str, HealthChange, str]


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[HealthChecker, FakeTime, ScriptedProbe]]:
    time = FakeTime()
    scripted_probe = ScriptedProbe(time)
    checker = HealthChecker(clock=time.clock, sleep=time.sleep, probe=scripted_probe)
    try:
        yield checker, time, scripted_probe
    finally:
        await checker.close()


async def test_checker_probes_fast_then_every_interval(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe],
) -> None:
    """The task probes at once, then 10 ms after each failure, then `interval` after healthy."""
    checker, time, scripted_probe = scripted
    changes: list[Change] = []
    checker.watch("i-1", "127.0.0.1:1", policy(interval=5.0), lambda *c: changes.append(c))
    assert await scripted_probe.next_call() == T0
    scripted_probe.answer(False)
    assert await scripted_probe.next_call() == pytest.approx(T0 + 0.001 + FAST_PROBE_INTERVAL)
    scripted_probe.answer(True)
    second = await scripted_probe.next_call()
    assert changes == [("i-1", HEALTHY, "fine")]
    assert second == pytest.approx(T0 + 0.002 + FAST_PROBE_INTERVAL + 5.0)
    assert time.sleeps == pytest.approx([FAST_PROBE_INTERVAL, 5.0])


async def test_checker_keeps_one_probe_in_flight(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe],
) -> None:
    """The interval runs from the end of each probe, so a slow probe delays the next one and two
    never overlap."""
    checker, _time, scripted_probe = scripted
    changes: list[Change] = []
    spec = policy(interval=1.0, timeout=0.5, unhealthy_threshold=2)
    checker.watch("i-1", "127.0.0.1:1", spec, lambda *c: changes.append(c))
    await scripted_probe.next_call()
    scripted_probe.answer(True)
    starts = [await scripted_probe.next_call()]
    for _ in range(3):
        scripted_probe.answer(False, took=0.5)  # as slow as the timeout allows
        starts.append(await scripted_probe.next_call())
    assert [b - a for a, b in itertools.pairwise(starts)] == pytest.approx([1.5, 1.5, 1.5])
    assert scripted_probe.max_in_flight == 1
    assert changes == [("i-1", HEALTHY, "fine"), ("i-1", UNHEALTHY, "connection refused")]


async def test_checker_stops_watching_after_start_timeout() -> None:
    """START_TIMEOUT is reported once, with the last probe's detail, and the watch ends."""
    time = FakeTime()
    scripted_probe = ScriptedProbe(time)
    checker = HealthChecker(
        clock=time.clock, sleep=time.sleep, probe=scripted_probe, start_timeout=0.05
    )
    done = asyncio.get_running_loop().create_future()
    checker.watch("i-1", "127.0.0.1:1", policy(), lambda *c: done.set_result(c))
    try:
        for _ in range(5):  # T0, +11, +22, +33, +44 ms: all before the deadline
            await scripted_probe.next_call()
            scripted_probe.answer(False)
        await scripted_probe.next_call()
        scripted_probe.answer(False)  # finishes at +56 ms, past the deadline
        assert await asyncio.wait_for(done, 5) == ("i-1", START_TIMEOUT, "connection refused")
        await asyncio.wait_for(_task_end(checker, "i-1"), 5)
        assert checker.watched() == frozenset()
        assert scripted_probe.calls.empty()
    finally:
        await checker.close()


async def test_checker_takes_the_start_timeout_from_the_service_file() -> None:
    """health_check.start_timeout bounds a start when the checker is not given one."""
    time = FakeTime()
    scripted_probe = ScriptedProbe(time)
    checker = HealthChecker(clock=time.clock, sleep=time.sleep, probe=scripted_probe)
    done = asyncio.get_running_loop().create_future()
    checker.watch("i-1", "127.0.0.1:1", policy(start_timeout=0.02), lambda *c: done.set_result(c))
    try:
        await scripted_probe.next_call()
        scripted_probe.answer(False)  # T0: before the deadline
        await scripted_probe.next_call()
        scripted_probe.answer(False)  # +11 ms
        await scripted_probe.next_call()
        scripted_probe.answer(False)  # +22 ms: past it
        assert await asyncio.wait_for(done, 5) == ("i-1", START_TIMEOUT, "connection refused")
    finally:
        await checker.close()


async def _task_end(checker: HealthChecker, instance_id: str) -> None:
    """Wait until the checker's task for `instance_id` has returned."""
    for task in asyncio.all_tasks():
        if task.get_name() == f"health-check {instance_id}":
            await asyncio.wait([task])


async def test_checker_unwatch_from_the_callback(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe],
) -> None:
    """Unwatching inside the callback ends the task: no further probe, no further callback."""
    checker, _time, scripted_probe = scripted
    changes: list[Change] = []

    def on_change(instance_id: str, change: HealthChange, detail: str) -> None:
        changes.append((instance_id, change, detail))
        checker.unwatch(instance_id)

    checker.watch("i-1", "127.0.0.1:1", policy(), on_change)
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "health-check i-1"]
    await scripted_probe.next_call()
    scripted_probe.answer(True)
    await asyncio.wait([task], timeout=5)
    assert task.done()
    assert changes == [("i-1", HEALTHY, "fine")]
    assert scripted_probe.calls.empty()
    assert checker.watched() == frozenset()


async def test_checker_callback_error_is_logged_and_watching_goes_on(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe], caplog: pytest.LogCaptureFixture
) -> None:
    """A callback that raises is logged; the instance is still probed."""
    checker, _time, scripted_probe = scripted

    def on_change(instance_id: str, change: HealthChange, detail: str) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="scaler.health"):
        checker.watch("i-1", "127.0.0.1:1", policy(), on_change)
        await scripted_probe.next_call()
        scripted_probe.answer(True)
        await scripted_probe.next_call()
    assert "callback failed for i-1" in caplog.text
    assert checker.watched() == {"i-1"}


async def test_checker_probe_error_counts_as_failure(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe], caplog: pytest.LogCaptureFixture
) -> None:
    """A probe that raises is logged and counts as a failed check with the error as detail."""
    checker, _time, scripted_probe = scripted
    changes: list[Change] = []
    spec = policy(unhealthy_threshold=1)
    with caplog.at_level(logging.ERROR, logger="scaler.health"):
        checker.watch("i-1", "127.0.0.1:1", spec, lambda *c: changes.append(c))
        await scripted_probe.next_call()
        scripted_probe.answer(True)
        await scripted_probe.next_call()
        scripted_probe.answers.put_nowait(ValueError("boom"))
        await scripted_probe.next_call()
    assert changes == [
        ("i-1", HEALTHY, "fine"),
        ("i-1", UNHEALTHY, "probe error: ValueError('boom')"),
    ]
    assert "health check of 127.0.0.1:1 raised" in caplog.text


async def test_checker_close_cancels_probing_and_sleeping_tasks() -> None:
    """close() cancels a task waiting on its probe and one sleeping, and waits for both."""
    time = FakeTime()
    scripted_probe = ScriptedProbe(time)
    checker = HealthChecker(clock=time.clock, sleep=time.sleep, probe=scripted_probe)
    time.gate = asyncio.Event()  # never set: sleeps never end
    checker.watch("i-1", "127.0.0.1:1", policy(), lambda *c: None)
    await scripted_probe.next_call()
    checker.watch("i-2", "127.0.0.1:2", policy(), lambda *c: None)
    await scripted_probe.next_call()
    scripted_probe.answer(False)  # one of the two takes it and goes to sleep
    await asyncio.wait_for(time.sleeping.wait(), 5)
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("health-check ")]
    assert len(tasks) == 2
    await asyncio.wait_for(checker.close(), 5)
    assert all(t.cancelled() for t in tasks)
    assert checker.watched() == frozenset()
    with pytest.raises(RuntimeError, match="closed"):
        checker.watch("late", "127.0.0.1:3", policy(), lambda *c: None)


async def test_checker_refuses_a_second_watch_of_one_instance(
    scripted: tuple[HealthChecker, FakeTime, ScriptedProbe],
) -> None:
    """Watching an instance twice is a bug in the caller, so it raises; unwatch then watch."""
    checker, _time, _probe = scripted
    checker.watch("i-1", "127.0.0.1:1", policy(), lambda *c: None)
    with pytest.raises(ValueError, match="already watched"):
        checker.watch("i-1", "127.0.0.1:1", policy(), lambda *c: None)
    checker.unwatch("i-1")
    checker.unwatch("i-1")  # unknown ids are ignored
    checker.watch("i-1", "127.0.0.1:1", policy(), lambda *c: None)
    assert checker.watched() == {"i-1"}


# --- HealthChecker end to end: real clock, real sockets ----------------------------------------


class CountingProbe:
    """The real probe, counting failures; `failing` is set after `after` failed checks."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.failures: list[str] = []
        self.failing = asyncio.Event()

    async def __call__(
        self,
        address: str,
        spec: HealthCheckSpec,
        *,
        session: aiohttp.ClientSession | None,
        settle: float,
    ) -> ProbeResult:
        result = await probe(address, spec, session=session, settle=settle)
        if not result.ok:
            self.failures.append(result.detail)
            if len(self.failures) >= self.after:
                self.failing.set()
        return result


def change_future(
    wanted: HealthChange,
) -> tuple[
    asyncio.Future[tuple[float, str]], list[Change], Callable[[str, HealthChange, str], None]
]:
    """A future set to (loop time, detail) at the first `wanted` change, and the callback."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[float, str]] = loop.create_future()
    seen: list[Change] = []

    def on_change(instance_id: str, change: HealthChange, detail: str) -> None:
        seen.append((instance_id, change, detail))
        if change is wanted and not future.done():
            future.set_result((loop.time(), detail))

    return future, seen, on_change


@pytest.mark.both_loops
async def test_checker_tcp_ready_within_milliseconds_of_listening() -> None:
    """An instance that starts listening late is reported HEALTHY well within 200 ms of it."""
    counting = CountingProbe(after=3)
    checker = HealthChecker(probe=counting)
    future, seen, on_change = change_future(HEALTHY)
    loop = asyncio.get_running_loop()
    try:
        with bound_not_listening() as sock:
            checker.watch("i-1", address_of(sock), policy(protocol="tcp"), on_change)
            await asyncio.wait_for(counting.failing.wait(), 5)  # refused a few times: starting
            sock.listen(16)
            listening_at = loop.time()
            ready_at, detail = await asyncio.wait_for(future, 5)
        assert ready_at - listening_at < READY_BOUND
        assert detail == "accepted a connection"
        assert set(counting.failures) == {"connection refused"}
        assert seen == [("i-1", HEALTHY, detail)]
    finally:
        await checker.close()


@pytest.mark.both_loops
async def test_checker_holds_longer_as_a_proxy_slows_down() -> None:
    """A proxy with nothing behind it, closing each connection twice as late as the one
    before (2, 4, 8 ... 64 ms): a busy host. Any fixed settle time below 64 ms would pass
    it; the checker's grows with the closes it sees, so the instance never becomes HEALTHY."""
    delays = iter(itertools.chain([0.002, 0.004, 0.008, 0.016, 0.032], itertools.repeat(0.064)))

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asyncio.get_running_loop().call_later(next(delays), writer.close)

    counting = CountingProbe(after=8)
    checker = HealthChecker(probe=counting)
    _, seen, on_change = change_future(HEALTHY)
    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    try:
        async with server:
            spec = policy(protocol="tcp", timeout=1.0)
            checker.watch("i-1", address_of(server.sockets[0]), spec, on_change)
            await asyncio.wait_for(counting.failing.wait(), 10)
        assert seen == []
        assert set(counting.failures) == {"accepted a connection and closed it at once"}
    finally:
        await checker.close()


@pytest.mark.both_loops
async def test_checker_http_ready_then_unhealthy_when_it_goes_away() -> None:
    """An http instance is HEALTHY soon after it starts serving, UNHEALTHY once it stops."""
    counting = CountingProbe(after=3)
    checker = HealthChecker(probe=counting)
    ready, seen, on_ready = change_future(HEALTHY)
    loop = asyncio.get_running_loop()
    gone: asyncio.Future[tuple[float, str]] = loop.create_future()

    def on_change(instance_id: str, change: HealthChange, detail: str) -> None:
        on_ready(instance_id, change, detail)
        if change is UNHEALTHY:
            gone.set_result((loop.time(), detail))

    spec = policy(protocol="http", path="/ok", interval=0.05, timeout=0.04, unhealthy_threshold=2)
    app = HttpApp()
    try:
        with bound_not_listening() as sock:
            checker.watch("i-1", address_of(sock), spec, on_change)
            await asyncio.wait_for(counting.failing.wait(), 5)
            runner = await start_http_app(app, sock)
            listening_at = loop.time()
            try:
                ready_at, detail = await asyncio.wait_for(ready, 5)
                assert ready_at - listening_at < READY_BOUND
                assert detail == "status 200"
            finally:
                await runner.cleanup()
            _, detail = await asyncio.wait_for(gone, 5)
        assert detail == "connection refused"
        assert [c for _, c, _ in seen] == [HEALTHY, UNHEALTHY]
    finally:
        await checker.close()
