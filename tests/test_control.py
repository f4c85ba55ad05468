"""Tests of the ingress's control API: the queue alone, then the server over a real socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
import uvloop

from ingress.control import (
    ControlClient,
    ControlError,
    ControlServer,
    ControlSocketError,
    SubscriberQueue,
)
from ingress.messages import (
    ColdStartEvent,
    DrainedEvent,
    Event,
    InstanceSpec,
    InstanceStats,
    ServiceRouting,
    ServiceStats,
    StatsEvent,
    StatsSnapshot,
)

DEADLINE = 2.0  # seconds: generous bound for anything that should happen "at once"


class FakeTarget:
    """An in-memory router: services in a dict, events pushed by the test."""

    def __init__(self) -> None:
        self.routings: dict[str, ServiceRouting] = {}
        self.listeners: list[Callable[[Event], None]] = []
        self.snapshots = 0  # snapshot() calls, also used as the snapshot's time
        self.broken = False  # services() raises, as a router bug would

    def _stats(self, name: str) -> ServiceStats:
        routing = self.routings[name]
        instances = [InstanceStats(id=i.id, state=i.state, inflight=0) for i in routing.instances]
        return ServiceStats(
            name=name, inflight=0, queued=0, arrivals=0, completions=0, instances=instances
        )

    def put_service(self, routing: ServiceRouting) -> ServiceStats:
        if routing.max_concurrency is not None and routing.max_concurrency < 1:
            raise ValueError("max_concurrency must be >= 1")
        self.routings[routing.name] = routing
        return self._stats(routing.name)

    def put_instances(self, name: str, instances: list[InstanceSpec]) -> ServiceStats:
        routing = self.routings[name]
        if len({i.id for i in instances}) != len(instances):
            raise ValueError("duplicate instance id")
        self.routings[name] = msgspec.structs.replace(routing, instances=instances)
        return self._stats(name)

    def delete_service(self, name: str) -> None:
        del self.routings[name]

    def services(self) -> list[ServiceRouting]:
        if self.broken:
            raise RuntimeError("router bug")
        return list(self.routings.values())

    def snapshot(self) -> StatsSnapshot:
        self.snapshots += 1
        return StatsSnapshot(
            time=float(self.snapshots), services=[self._stats(n) for n in self.routings]
        )

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Callable[[Event], None]) -> None:
        self.listeners.remove(listener)

    def push(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)


HELLO = ServiceRouting(
    name="hello",
    domains=["hello.example.com"],
    max_concurrency=10,
    queue_timeout=5.0,
    instances=[InstanceSpec(id="a", address="127.0.0.1:9001")],
)


@pytest.fixture
def target() -> FakeTarget:
    return FakeTarget()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "ctl.sock"


@pytest.fixture
async def server(target: FakeTarget, sock_path: Path) -> AsyncIterator[ControlServer]:
    srv = ControlServer(target, sock_path, stats_interval=0.05, max_pending=64)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client(server: ControlServer) -> AsyncIterator[ControlClient]:
    cli = ControlClient(server.path)
    yield cli
    await cli.close()


async def raw(path: Path, method: str, url: str, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP request on the socket, with the body exactly as given."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
        session.request(method, "http://ingress" + url, data=body) as resp,
    ):
        return resp.status, await resp.read()


def error_of(body: bytes) -> str:
    return msgspec.json.decode(body, type=dict[str, str])["error"]


# -- SubscriberQueue ----------------------------------------------------------------------------


def drain(queue: SubscriberQueue) -> list[bytes]:
    frames = []
    while (frame := queue.pop()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize(
    ("pushes", "expected"),
    [
        pytest.param(["S1"], ["S1"], id="one-stats"),
        pytest.param(["S1", "S2", "S3"], ["S3"], id="stats-supersede"),
        pytest.param(["E1", "E2"], ["E1", "E2"], id="events-kept"),
        pytest.param(["S1", "E1", "S2"], ["E1", "S2"], id="newer-stats-moves-back"),
        pytest.param(["E1", "S1", "E2", "S2", "E3"], ["E1", "E2", "S2", "E3"], id="interleaved"),
        pytest.param(["E1", "S1", "E2"], ["E1", "S1", "E2"], id="order-kept"),
    ],
)
def test_queue_order(pushes: list[str], expected: list[str]) -> None:
    """Frames come out in push order, with every stats frame but the newest dropped."""
    queue = SubscriberQueue(8)
    for p in pushes:
        if p.startswith("S"):
            queue.push_stats(p.encode())
        else:
            assert queue.push_event(p.encode())
    assert drain(queue) == [e.encode() for e in expected]


def test_queue_refuses_events_past_maxsize_but_takes_stats() -> None:
    """Events past maxsize are refused, stats still fit, and the length never passes maxsize+1."""
    queue = SubscriberQueue(3)
    assert [queue.push_event(b"E%d" % i) for i in range(5)] == [True, True, True, False, False]
    for i in range(100):
        queue.push_stats(b"S%d" % i)
        assert len(queue) == 4
    assert drain(queue) == [b"E0", b"E1", b"E2", b"S99"]


def test_queue_pop_interleaved_with_pushes() -> None:
    """A stats frame pushed while earlier events are being sent still goes after them."""
    queue = SubscriberQueue(4)
    queue.push_event(b"E1")
    queue.push_event(b"E2")
    queue.push_stats(b"S1")
    assert queue.pop() == b"E1"
    queue.push_event(b"E3")
    queue.push_stats(b"S2")
    assert drain(queue) == [b"E2", b"E3", b"S2"]


def test_queue_clear_and_bad_maxsize() -> None:
    """clear() empties the queue and a maxsize below 1 is rejected."""
    queue = SubscriberQueue(2)
    queue.push_event(b"E")
    queue.push_stats(b"S")
    queue.clear()
    assert len(queue) == 0 and queue.pop() is None
    with pytest.raises(ValueError):
        SubscriberQueue(0)


# -- endpoints ----------------------------------------------------------------------------------


async def test_put_service_then_list(client: ControlClient) -> None:
    """PUT /v1/services/{name} returns the service's stats and GET /v1/services lists it."""
    stats = await client.put_service(HELLO)
    assert stats.name == "hello"
    assert [i.id for i in stats.instances] == ["a"]
    assert await client.services() == [HELLO]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b'{"name": hello}', "malformed", id="bad-json"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b'{"name": "hello", "weight": 3}', "unknown field `weight`", id="unknown"),
        pytest.param(
            b'{"name": "hello", "instances": [{"id": "a", "address": "x:1", "zone": "b"}]}',
            "`$.instances[0]`",
            id="unknown-nested",
        ),
        pytest.param(
            b'{"name": "hello", "max_concurrency": "ten"}', "`$.max_concurrency`", id="wrong-type"
        ),
        pytest.param(
            b'{"name": "hello", "instances": [{"id": "a", "address": "x:1", "state": "gone"}]}',
            "`$.instances[0].state`",
            id="bad-literal",
        ),
        pytest.param(b'{"domains": []}', "missing required field `name`", id="missing"),
    ],
)
async def test_put_service_bad_body(server: ControlServer, body: bytes, fragment: str) -> None:
    """A body msgspec rejects gets 400 with msgspec's message, naming the field path."""
    status, answer = await raw(Path(server.path), "PUT", "/v1/services/hello", body)
    assert status == 400
    assert fragment in error_of(answer)


async def test_put_service_name_mismatch(server: ControlServer, target: FakeTarget) -> None:
    """A path name differing from the body's name is a 400 and changes nothing."""
    body = msgspec.json.encode(HELLO)
    status, answer = await raw(Path(server.path), "PUT", "/v1/services/other", body)
    assert status == 400
    assert "'other'" in error_of(answer) and "'hello'" in error_of(answer)
    assert target.routings == {}


async def test_put_service_rejected_by_target(client: ControlClient) -> None:
    """A ValueError from the target becomes a 400 carrying its message."""
    with pytest.raises(ControlError) as caught:
        await client.put_service(msgspec.structs.replace(HELLO, max_concurrency=0))
    assert caught.value.status == 400
    assert caught.value.message == "max_concurrency must be >= 1"


async def test_put_instances(client: ControlClient, target: FakeTarget) -> None:
    """PUT /v1/services/{name}/instances replaces the instances and returns the stats."""
    await client.put_service(HELLO)
    instances = [
        InstanceSpec(id="b", address="[::1]:9002"),
        InstanceSpec(id="a", address="127.0.0.1:9001", state="draining"),
    ]
    stats = await client.put_instances("hello", instances)
    assert [(i.id, i.state) for i in stats.instances] == [("b", "ready"), ("a", "draining")]
    assert target.routings["hello"].instances == instances


async def test_put_instances_errors(client: ControlClient, server: ControlServer) -> None:
    """Unknown service is 404, a target ValueError 400, a bad element 400 with its path."""
    with pytest.raises(ControlError) as caught:
        await client.put_instances("nope", [])
    assert caught.value.status == 404
    assert "'nope'" in caught.value.message

    await client.put_service(HELLO)
    twice = [InstanceSpec(id="a", address="h:1"), InstanceSpec(id="a", address="h:2")]
    with pytest.raises(ControlError) as caught:
        await client.put_instances("hello", twice)
    assert (caught.value.status, caught.value.message) == (400, "duplicate instance id")

    body = b'[{"id": "a", "address": "h:1"}, {"id": "b", "address": 7}]'
    status, answer = await raw(Path(server.path), "PUT", "/v1/services/hello/instances", body)
    assert status == 400
    assert "`$[1].address`" in error_of(answer)


async def test_delete_service(client: ControlClient, target: FakeTarget) -> None:
    """DELETE removes a known service (204) and answers 404 for an unknown one."""
    await client.put_service(HELLO)
    await client.delete_service("hello")
    assert target.routings == {}
    with pytest.raises(ControlError) as caught:
        await client.delete_service("hello")
    assert caught.value.status == 404


async def test_stats(client: ControlClient) -> None:
    """GET /v1/stats returns the target's snapshot."""
    await client.put_service(HELLO)
    snapshot = await client.stats()
    assert [s.name for s in snapshot.services] == ["hello"]


@pytest.mark.parametrize(
    ("method", "url", "status"),
    [
        pytest.param("GET", "/v1/nothing", 404, id="no-route"),
        pytest.param("POST", "/v1/services", 405, id="bad-method"),
        pytest.param("GET", "/v1/subscribe", 400, id="subscribe-without-upgrade"),
    ],
)
async def test_other_errors_are_json(
    server: ControlServer, method: str, url: str, status: int
) -> None:
    """Errors aiohttp raises itself still come back as {"error": ...}."""
    got, answer = await raw(Path(server.path), method, url)
    assert got == status
    assert error_of(answer)


async def test_target_crash_is_json_500(client: ControlClient, target: FakeTarget) -> None:
    """An unexpected exception in the target is a 500 whose error names it."""
    target.broken = True
    with pytest.raises(ControlError) as caught:
        await client.services()
    assert caught.value.status == 500
    assert "RuntimeError: router bug" in caught.value.message


async def test_unreachable_ingress(tmp_path: Path) -> None:
    """A client whose socket has no server raises ControlError with status 0."""
    cli = ControlClient(tmp_path / "none.sock")
    try:
        with pytest.raises(ControlError) as caught:
            await cli.stats()
        assert caught.value.status == 0
    finally:
        await cli.close()


# -- the socket ---------------------------------------------------------------------------------


async def test_socket_and_directory_modes(server: ControlServer, sock_path: Path) -> None:
    """The socket is 0600 and its missing parent directory was created 0700."""
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700


async def test_stale_socket_is_replaced(target: FakeTarget, sock_path: Path) -> None:
    """A socket file left by a dead process is removed and the server starts."""
    sock_path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock_path))  # bound, never listening, then closed: as after a crash
    assert sock_path.exists()
    srv = ControlServer(target, sock_path)
    await srv.start()
    cli = ControlClient(sock_path)
    try:
        assert await cli.services() == []
    finally:
        await cli.close()
        await srv.close()


async def test_live_socket_is_refused(
    server: ControlServer, client: ControlClient, target: FakeTarget, sock_path: Path
) -> None:
    """A second server on a path a live one answers on fails and leaves the first working."""
    second = ControlServer(FakeTarget(), sock_path)
    with pytest.raises(ControlSocketError, match="another process is listening"):
        await second.start()
    await second.close()
    await client.put_service(HELLO)
    assert "hello" in target.routings


async def test_regular_file_is_not_replaced(target: FakeTarget, tmp_path: Path) -> None:
    """A path holding something other than a socket is refused and left alone."""
    path = tmp_path / "ctl.sock"
    path.write_text("keep me")
    with pytest.raises(ControlSocketError, match="not a socket"):
        await ControlServer(target, path).start()
    assert path.read_text() == "keep me"


async def test_close_removes_socket(target: FakeTarget, sock_path: Path) -> None:
    """close() removes the socket file and unregisters the event listener."""
    srv = ControlServer(target, sock_path)
    await srv.start()
    assert sock_path.exists() and len(target.listeners) == 1
    await srv.close()
    assert not sock_path.exists()
    assert target.listeners == []


async def test_close_keeps_a_successors_socket(target: FakeTarget, sock_path: Path) -> None:
    """close() leaves alone a socket file that another server has put at the path since."""
    first = ControlServer(target, sock_path)
    await first.start()
    os.unlink(sock_path)
    second = ControlServer(FakeTarget(), sock_path)
    await second.start()
    await first.close()
    assert sock_path.exists()
    await second.close()
    assert not sock_path.exists()


# -- subscriptions ------------------------------------------------------------------------------


async def next_of(
    events: AsyncIterator[Event], kind: type | tuple[type, ...] | None = None
) -> Event:
    """The next event (of ``kind``, skipping others), within the deadline."""
    async with asyncio.timeout(DEADLINE):
        async for event in events:
            if kind is None or isinstance(event, kind):
                return event
    raise AssertionError("subscription ended")


async def test_subscription_starts_with_stats_then_ticks(
    client: ControlClient, target: FakeTarget
) -> None:
    """A subscriber gets a stats event at once, then more every interval."""
    target.put_service(HELLO)
    events = client.subscribe()
    started = time.monotonic()
    first = await next_of(events)
    assert isinstance(first, StatsEvent)
    assert [s.name for s in first.snapshot.services] == ["hello"]
    assert time.monotonic() - started < 0.3
    for _ in range(3):
        tick = await next_of(events)
        assert isinstance(tick, StatsEvent)
        assert tick.snapshot.time > first.snapshot.time
    await events.aclose()


async def test_pushed_events_arrive_promptly_and_in_order(
    client: ControlClient, target: FakeTarget
) -> None:
    """Cold-start and drained events pushed by the target arrive at once, in push order."""
    events = client.subscribe()
    await next_of(events, StatsEvent)
    pushed: list[Event] = [
        ColdStartEvent(service="hello", queued=1, time=1.0),
        DrainedEvent(service="hello", instance="a", time=2.0),
        ColdStartEvent(service="hello", queued=2, time=3.0),
    ]
    started = time.monotonic()
    for event in pushed:
        target.push(event)
    got = [await next_of(events, (ColdStartEvent, DrainedEvent)) for _ in pushed]
    assert got == pushed
    assert time.monotonic() - started < 0.3
    await events.aclose()


async def test_one_snapshot_per_tick_for_all_subscribers(
    server: ControlServer, target: FakeTarget
) -> None:
    """Two subscribers receive the very same periodic snapshots, taken once per tick."""
    clients = [ControlClient(server.path), ControlClient(server.path)]
    a, b = (c.subscribe() for c in clients)
    try:
        await next_of(a)
        await next_of(b)  # b's own first snapshot; from here on both share each tick's
        seen_by_b = []
        for _ in range(3):
            event = await next_of(b)
            assert isinstance(event, StatsEvent)
            seen_by_b.append(event.snapshot.time)
        seen_by_a: list[float] = []
        while len(seen_by_a) == 0 or seen_by_a[-1] < seen_by_b[-1]:
            event = await next_of(a)
            assert isinstance(event, StatsEvent)
            seen_by_a.append(event.snapshot.time)
        assert seen_by_b == seen_by_a[-3:]
    finally:
        await a.aclose()
        await b.aclose()
        for c in clients:
            await c.close()


async def test_slow_subscriber_does_not_block_the_push(
    client: ControlClient, server: ControlServer, target: FakeTarget
) -> None:
    """10,000 synchronous pushes return fast; the unread subscriber is closed, not buffered."""
    events = client.subscribe()
    await next_of(events)  # subscribed; from now on the test does not read until the pushes end
    started = time.perf_counter()
    for i in range(10_000):
        target.push(ColdStartEvent(service="hello", queued=i, time=float(i)))
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"10,000 pushes took {elapsed:.3f} s"
    received = 0
    with pytest.raises(ControlError, match=r"\(1013\).*too slow"):
        async with asyncio.timeout(DEADLINE):
            async for _ in events:
                received += 1
    assert received <= 64 + 1  # at most the queue's bound, plus one stats frame


async def test_close_ends_subscriptions(target: FakeTarget, sock_path: Path) -> None:
    """close() ends open subscriptions with 1001 and returns promptly."""
    srv = ControlServer(target, sock_path)
    await srv.start()
    cli = ControlClient(sock_path)
    events = cli.subscribe()
    try:
        await next_of(events)
        async with asyncio.timeout(DEADLINE):
            await srv.close()
        with pytest.raises(ControlError, match=r"\(1001\)"):
            await next_of(events, ColdStartEvent)
    finally:
        await events.aclose()
        await cli.close()
    assert not sock_path.exists()


async def test_client_close_ends_subscription_quietly(client: ControlClient) -> None:
    """Closing the client makes a running subscription return instead of raising."""
    events = client.subscribe()
    await next_of(events)
    await client.close()
    async with asyncio.timeout(DEADLINE):
        rest = [e async for e in events]
    assert all(isinstance(e, StatsEvent) for e in rest)


# -- the same on uvloop -------------------------------------------------------------------------


async def _scenario(path: Path) -> None:
    target = FakeTarget()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))
    srv = ControlServer(target, path, stats_interval=0.05)
    await srv.start()
    cli = ControlClient(path)
    events = cli.subscribe()
    try:
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        await cli.put_service(HELLO)
        assert isinstance(await next_of(events), StatsEvent)
        target.push(DrainedEvent(service="hello", instance="a", time=1.0))
        assert isinstance(await next_of(events, DrainedEvent), DrainedEvent)
    finally:
        await events.aclose()
        await cli.close()
        await srv.close()
    assert not path.exists()


LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def loop_factory(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[], asyncio.AbstractEventLoop]]:
    yield LOOPS[request.param]


def test_scenario_on_each_loop(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], sock_path: Path
) -> None:
    """Stale socket, 0600 mode, a PUT and a subscription work on asyncio's loop and uvloop."""
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_scenario(sock_path))
