"""ingress/systemd.py and `tidegate ingress` under a stand-in for systemd.

The parsing of sd_notify, watchdog and socket-activation variables is tested as tables; the
Notifier against real unix datagram sockets (a path and an abstract name); socket activation
on real listening sockets placed at known descriptor numbers. The end-to-end test plays
systemd: it opens the listener, starts the ingress with it as fd 3, reads the notification
socket, and checks READY=1, WATCHDOG=1, STOPPING=1 and the drain against what the ingress does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from ingress.systemd import (
    Listeners,
    Notifier,
    Ticker,
    ingress_listeners,
    listen_fds,
    notify_address,
    start_watchdog,
    watchdog_interval,
)
from tests.backends import running_backends
from tests.conftest import routing, running_ingress, wait_for
from tests.procs import READY_TIMEOUT, REPO, free_port, stop

DEADLINE = 5.0  # seconds for anything that should happen at once
PID = 4242  # the pid the parsing tables pretend to be


# -- NOTIFY_SOCKET --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "address"),
    [
        pytest.param("", None, id="unset"),
        pytest.param("/run/systemd/notify", "/run/systemd/notify", id="path"),
        pytest.param("@/org/systemd/notify", "\0/org/systemd/notify", id="abstract"),
    ],
)
def test_notify_address(value: str, address: str | None) -> None:
    """A path is used as is; a leading @ becomes the NUL byte of the abstract namespace."""
    assert notify_address(value) == address


@pytest.mark.parametrize("value", ["@", "run/notify", "vsock:2:1234"])
def test_notify_address_rejects(value: str) -> None:
    """What tidegate cannot send to (a relative path, vsock, a bare @) is a ValueError."""
    with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
        notify_address(value)


def test_from_environ_unsets_what_it_read() -> None:
    """NOTIFY_SOCKET and the watchdog variables are removed, so children do not inherit them;
    other variables stay."""
    env = {
        "NOTIFY_SOCKET": "@n",
        "WATCHDOG_USEC": "3000000",
        "WATCHDOG_PID": str(PID),
        "PATH": "/bin",
    }
    notifier = Notifier.from_environ(env, PID)
    assert (notifier.address, notifier.watchdog_timeout) == ("\0n", 3.0)
    assert env == {"PATH": "/bin"}


def test_from_environ_bad_values_disable_not_fail(caplog: pytest.LogCaptureFixture) -> None:
    """A NOTIFY_SOCKET or WATCHDOG_USEC systemd would not write is logged and ignored."""
    caplog.set_level(logging.WARNING, "tidegate.systemd")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "relative", "WATCHDOG_USEC": "x"}, PID)
    assert not notifier.enabled and notifier.watchdog_timeout is None
    assert not notifier.ready("serving")
    assert "not notifying systemd" in caplog.text
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "x"}, PID)
    assert notifier.enabled and notifier.watchdog_timeout is None
    assert "no systemd watchdog" in caplog.text


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    """Not run by systemd: nothing is sent and nothing fails."""
    notifier = Notifier.from_environ({}, PID)
    assert not notifier.enabled
    assert not any(
        (notifier.ready("x"), notifier.status("x"), notifier.stopping(), notifier.watchdog())
    )
    notifier.close()


@contextlib.contextmanager
def datagram_receiver(address: str) -> Iterator[socket.socket]:
    """An AF_UNIX datagram socket bound at `address` (a path, or NUL + an abstract name)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(address)
        sock.settimeout(DEADLINE)
        yield sock
    finally:
        sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory under /tmp: a unix socket path must fit in 108 bytes, tmp_path may not."""
    with tempfile.TemporaryDirectory(prefix="tg-", dir="/tmp") as path:
        yield Path(path)


def test_notifier_sends_one_datagram_to_a_path(short_dir: Path) -> None:
    """Fields go as KEY=VALUE lines of one datagram; a newline in a value cannot split it."""
    path = str(short_dir / "notify")
    with datagram_receiver(path) as receiver:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path}, PID)
        try:
            assert notifier.ready("serving 1 service(s)")
            assert receiver.recv(4096) == b"READY=1\nSTATUS=serving 1 service(s)"
            assert notifier.status("two\nlines")
            assert receiver.recv(4096) == b"STATUS=two lines"
            assert notifier.stopping("draining 1 connection(s)")
            assert receiver.recv(4096) == b"STOPPING=1\nSTATUS=draining 1 connection(s)"
            assert notifier.watchdog()
            assert receiver.recv(4096) == b"WATCHDOG=1"
        finally:
            notifier.close()


def test_notifier_sends_to_an_abstract_socket() -> None:
    """NOTIFY_SOCKET=@name reaches a socket bound in the abstract namespace."""
    name = f"tidegate-test-{uuid.uuid4().hex}"
    with datagram_receiver("\0" + name) as receiver:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, PID)
        try:
            assert notifier.ready()
            assert receiver.recv(4096) == b"READY=1"
        finally:
            notifier.close()


def test_notifier_failure_is_logged_once_and_never_raises(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody listening at NOTIFY_SOCKET: sends return False, one warning, no exception."""
    caplog.set_level(logging.WARNING, "tidegate.systemd")
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "gone")}, PID)
    try:
        assert not notifier.watchdog()
        assert not notifier.watchdog()
    finally:
        notifier.close()
    assert caplog.text.count("cannot notify systemd") == 1


# -- the watchdog ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "timeout"),
    [
        pytest.param({}, None, id="no watchdog"),
        pytest.param({"WATCHDOG_USEC": "200000"}, 0.2, id="usec"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(PID)}, 30.0, id="our pid"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None, id="other pid"),
        pytest.param({"WATCHDOG_PID": str(PID)}, None, id="pid alone"),
    ],
)
def test_watchdog_interval(env: dict[str, str], timeout: float | None) -> None:
    """WATCHDOG_USEC in seconds, only when WATCHDOG_PID (if set) is ours; both are unset."""
    assert watchdog_interval(env, PID) == timeout
    assert env == {}


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"WATCHDOG_USEC": "abc"}, id="not a number"),
        pytest.param({"WATCHDOG_USEC": "-5"}, id="negative"),
        pytest.param({"WATCHDOG_USEC": "0"}, id="zero"),
        pytest.param({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "me"}, id="bad pid"),
    ],
)
def test_watchdog_interval_rejects(env: dict[str, str]) -> None:
    """What sd_watchdog_enabled(3) calls -EINVAL is a ValueError naming the variable."""
    with pytest.raises(ValueError, match="WATCHDOG_"):
        watchdog_interval(env, PID)


class FakeHandle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just call_later, recorded; the test fires the callbacks (time is passed in)."""

    def __init__(self) -> None:
        self.timers: list[tuple[float, Callable[[], object], FakeHandle]] = []

    def call_later(self, delay: float, callback: Callable[[], object]) -> FakeHandle:
        handle = FakeHandle()
        self.timers.append((delay, callback, handle))
        return handle

    def fire(self) -> float:
        """Run the latest timer's callback; its delay."""
        delay, callback, handle = self.timers[-1]
        assert not handle.cancelled
        callback()
        return delay


class RecordingNotifier(Notifier):
    def __init__(self, watchdog_timeout: float | None) -> None:
        super().__init__("\0unused", watchdog_timeout=watchdog_timeout)
        self.sent: list[str] = []

    def send(self, text: str) -> bool:
        self.sent.append(text)
        return True


def test_watchdog_pings_now_and_every_half_timeout() -> None:
    """One ping at once, then one per half the timeout, each re-armed from the loop."""
    loop = FakeLoop()
    notifier = RecordingNotifier(watchdog_timeout=0.2)
    ticker = start_watchdog(loop, notifier)  # type: ignore[arg-type]
    assert ticker is not None and ticker.interval == pytest.approx(0.1)
    assert notifier.sent == ["WATCHDOG=1"]
    assert [loop.fire() for _ in range(3)] == [0.1, 0.1, 0.1]
    assert notifier.sent == ["WATCHDOG=1"] * 4
    ticker.cancel()
    assert loop.timers[-1][2].cancelled


def test_no_watchdog_without_timeout_or_socket() -> None:
    """No WATCHDOG_USEC, or nowhere to send: no ticker, no ping."""
    loop = FakeLoop()
    assert start_watchdog(loop, RecordingNotifier(None)) is None  # type: ignore[arg-type]
    assert start_watchdog(loop, Notifier(None, watchdog_timeout=1.0)) is None  # type: ignore[arg-type]
    assert loop.timers == []


def test_ticker_keeps_ticking_after_an_exception() -> None:
    """The next tick is armed before the callback runs, so one failure does not end it."""
    loop = FakeLoop()
    calls = []

    def fail() -> None:
        calls.append(1)
        raise RuntimeError("boom")

    Ticker(loop, 5.0, fail)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        loop.fire()
    assert len(loop.timers) == 2 and calls == [1]


# -- socket activation: parsing -------------------------------------------------------------


def _fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@contextlib.contextmanager
def placed(socks: list[socket.socket]) -> Iterator[int]:
    """Duplicates of `socks` at consecutive descriptors from a free base (as systemd puts them
    from 3); the base. Whatever is left open there is closed on exit."""
    base = 600
    while any(_fd_is_open(fd) for fd in range(base, base + len(socks))):
        base += len(socks) + 1
    for i, sock in enumerate(socks):
        os.dup2(sock.fileno(), base + i)
    try:
        yield base
    finally:
        for fd in range(base, base + len(socks)):
            with contextlib.suppress(OSError):
                os.close(fd)


def _listener(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    """Two listening TCP sockets on 127.0.0.1."""
    socks = [_listener(), _listener()]
    yield socks
    for sock in socks:
        sock.close()


def _activation_env(count: int, names: str | None = None, pid: int = PID) -> dict[str, str]:
    env = {"LISTEN_PID": str(pid), "LISTEN_FDS": str(count), "OTHER": "kept"}
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    return env


def _close_all(named: dict[str, list[socket.socket]]) -> None:
    for socks in named.values():
        for sock in socks:
            sock.close()


def test_listen_fds_by_name(listeners: list[socket.socket]) -> None:
    """Two fds named http and https become non-blocking, close-on-exec sockets on the same
    ports, and the three variables are unset."""
    with placed(listeners) as base:
        env = _activation_env(2, "http:https")
        named = listen_fds(env, PID, start=base)
        try:
            assert env == {"OTHER": "kept"}
            assert sorted(named) == ["http", "https"]
            for name, original in zip(("http", "https"), listeners, strict=True):
                (sock,) = named[name]
                assert sock.getsockname() == original.getsockname()
                assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
                assert not sock.getblocking()
                assert not os.get_inheritable(sock.fileno())
        finally:
            _close_all(named)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(None, {"unknown": 2}, id="no names"),
        pytest.param("http:", {"http": 1, "unknown": 1}, id="one empty name"),
        pytest.param("tidegate.socket:tidegate.socket", {"tidegate.socket": 2}, id="unit name"),
    ],
)
def test_listen_fds_names(
    listeners: list[socket.socket], names: str | None, expected: dict[str, int]
) -> None:
    """A missing or empty name is 'unknown'; fds sharing a name are listed together."""
    with placed(listeners) as base:
        named = listen_fds(_activation_env(2, names), PID, start=base)
        try:
            assert {name: len(socks) for name, socks in named.items()} == expected
        finally:
            _close_all(named)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="not activated"),
        pytest.param(_activation_env(2, pid=PID + 1), id="another pid"),
        pytest.param({"LISTEN_FDS": "2"}, id="no LISTEN_PID"),
        pytest.param({"LISTEN_PID": str(PID)}, id="no LISTEN_FDS"),
        pytest.param(_activation_env(0), id="zero fds"),
    ],
)
def test_listen_fds_not_for_us(listeners: list[socket.socket], env: dict[str, str]) -> None:
    """Nothing is taken, and the fds are left alone, unless LISTEN_PID is our pid and
    LISTEN_FDS counts some; the variables are unset all the same."""
    with placed(listeners) as base:
        env = dict(env)
        assert listen_fds(env, PID, start=base) == {}
        assert not any(key.startswith("LISTEN_") for key in env)
        assert _fd_is_open(base) and _fd_is_open(base + 1)
        assert os.get_inheritable(base)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param(_activation_env(2, pid=0) | {"LISTEN_PID": "self"}, "LISTEN_PID", id="pid"),
        pytest.param(_activation_env(2) | {"LISTEN_FDS": "two"}, "LISTEN_FDS", id="count"),
        pytest.param(_activation_env(2) | {"LISTEN_FDS": "-1"}, "LISTEN_FDS", id="negative"),
        pytest.param(_activation_env(2, "http"), "1 name.* for LISTEN_FDS=2", id="few names"),
        pytest.param(_activation_env(2, "a:b:c"), "3 name.* for LISTEN_FDS=2", id="many names"),
    ],
)
def test_listen_fds_rejects_values(
    listeners: list[socket.socket], env: dict[str, str], message: str
) -> None:
    """A value systemd would not write is a ValueError that names the variable."""
    with placed(listeners) as base:
        with pytest.raises(ValueError, match=message):
            listen_fds(dict(env), PID, start=base)
        assert _fd_is_open(base) and _fd_is_open(base + 1)


@contextlib.contextmanager
def _not_listening(kind: str) -> Iterator[list[int]]:
    """Descriptors that are not listening stream sockets: (fd to close, ...)."""
    if kind == "pipe":
        read, write = os.pipe()
        try:
            yield [read]
        finally:
            os.close(read)
            os.close(write)
        return
    if kind == "udp":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.bind(("127.0.0.1", 0))
        yield [sock.fileno()]


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        pytest.param("pipe", "is not a socket", id="pipe"),
        pytest.param("udp", "is not a stream socket", id="udp"),
        pytest.param("tcp", "is not listening", id="bound, not listening"),
    ],
)
def test_listen_fds_rejects_descriptors(
    listeners: list[socket.socket], kind: str, message: str
) -> None:
    """A second fd that is not a listening stream socket: ValueError naming it, and every
    descriptor is left open as handed in."""
    with _not_listening(kind) as (fd,), placed([listeners[0]]) as base:
        os.dup2(fd, base + 1)
        try:
            with pytest.raises(ValueError, match=f"fd {base + 1} {message}"):
                listen_fds(_activation_env(2), PID, start=base)
            assert _fd_is_open(base) and _fd_is_open(base + 1)
        finally:
            os.close(base + 1)


def test_listen_fds_rejects_a_closed_descriptor(listeners: list[socket.socket]) -> None:
    """LISTEN_FDS counting past the descriptors actually open is a ValueError."""
    with placed([listeners[0]]) as base:
        assert not _fd_is_open(base + 1)
        with pytest.raises(ValueError, match=f"fd {base + 1}"):
            listen_fds(_activation_env(2), PID, start=base)


# -- socket activation: the ingress's listeners ---------------------------------------------


def test_ingress_listeners_https_by_name_the_rest_http(listeners: list[socket.socket]) -> None:
    """Sockets named https are TLS listeners; http, unknown and unit names are plain HTTP."""
    a, b = listeners
    with _listener() as c:
        got = ingress_listeners({"https": [a], "http": [b], "tidegate.socket": [c]})
        assert got == Listeners(http=[b, c], https=[a])
    assert ingress_listeners({}) is None


def test_ingress_listeners_refuses_metrics_and_unix_sockets(short_dir: Path) -> None:
    """An fd named metrics, or a non-TCP socket, is refused with a clear message."""
    with _listener() as tcp:
        with pytest.raises(ValueError, match="metrics listener is not socket-activated"):
            ingress_listeners({"http": [tcp], "metrics": [tcp]})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.bind(str(short_dir / "s"))
        unix.listen()
        with pytest.raises(ValueError, match="AF_UNIX, not a TCP socket"):
            ingress_listeners({"http": [unix]})


async def test_status_text_counts_services_instances_and_drain() -> None:
    """The periodic STATUS line: services, ready instances, in flight and queued."""
    async with (
        running_backends(1) as (backend,),
        running_ingress([routing("svc", [backend.address])]) as ingress,
    ):
        assert ingress.status_text() == (
            "serving 1 service(s), 1 ready instance(s), 0 request(s) in flight, 0 queued"
        )
        host, port = ingress.http_addresses[0]
        assert ingress.listening_text() == f"http://{host}:{port}"


# -- end to end: `tidegate ingress` as a systemd service ------------------------------------

# The child that systemd would be: LISTEN_PID must be the pid of the process that reads it,
# known only after the fork, so a small wrapper moves the listener to fd 3 (SD_LISTEN_FDS_START),
# sets LISTEN_PID to its own pid and execs the ingress, which keeps that pid. (systemd does the
# same between its fork and exec.)
ACTIVATE = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


class NotifyReader:
    """The test's systemd: the datagrams on NOTIFY_SOCKET, with their arrival times."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setblocking(False)
        self.seen: list[tuple[float, dict[str, str]]] = []
        self._queue: asyncio.Queue[tuple[float, dict[str, str]]] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            message = (loop.time(), fields)
            self.seen.append(message)
            self._queue.put_nowait(message)

    async def next_with(self, key: str, timeout: float = DEADLINE) -> tuple[float, dict[str, str]]:
        """The next message (in order) that sets `key`; the ones before it are skipped."""
        async with asyncio.timeout(timeout):
            while True:
                message = await self._queue.get()
                if key in message[1]:
                    return message

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close()


@contextlib.asynccontextmanager
async def notify_reader(directory: Path) -> AsyncIterator[NotifyReader]:
    reader = NotifyReader(str(directory / "notify"))
    try:
        yield reader
    finally:
        await reader.close()


async def start_activated(
    listener: socket.socket, name: str, notify: str, log: Path, *args: str
) -> asyncio.subprocess.Process:
    """`tidegate ingress ARGS` with `listener` as fd 3 named `name`, NOTIFY_SOCKET=`notify`
    and a 200 ms watchdog."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    env |= {
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": name,
        "NOTIFY_SOCKET": notify,
        "WATCHDOG_USEC": "200000",
    }
    argv = [sys.executable, "-c", ACTIVATE, str(listener.fileno()), "-m", "tidegate", "ingress"]
    with log.open("wb") as sink:
        return await asyncio.create_subprocess_exec(
            *argv,
            *args,
            cwd=REPO,
            env=env,
            pass_fds=(listener.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """GET `path` on 127.0.0.1:`port` with Connection: close; (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n".encode())
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_ingress_under_systemd_ready_watchdog_and_stopping(short_dir: Path) -> None:
    """With a socket-activated listener and NOTIFY_SOCKET: READY=1 comes once the listener
    answers, WATCHDOG=1 every ~100 ms for WATCHDOG_USEC=200000, and SIGTERM gives STOPPING=1,
    a request in flight completed, and exit 0."""
    metrics_port = free_port()
    log = short_dir / "ingress.log"
    process: asyncio.subprocess.Process | None = None

    def output() -> str:
        return log.read_text(errors="replace") if log.exists() else ""

    with _listener() as listener:
        port = listener.getsockname()[1]
        async with (
            running_backends(1) as (backend,),
            notify_reader(short_dir) as notify,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session,
        ):
            try:
                process = await start_activated(
                    listener,
                    "http",
                    notify.path,
                    log,
                    "--static-upstream",
                    backend.address,
                    "--metrics-listen",
                    f"127.0.0.1:{metrics_port}",
                    "--drain-timeout",
                    "20s",
                )
                try:
                    ready_at, ready = await notify.next_with("READY", timeout=READY_TIMEOUT)
                except TimeoutError:
                    pytest.fail(f"no READY=1 within {READY_TIMEOUT} s:\n{output()}")
                # at READY=1 the ingress has started listening with the routes loaded (it logs
                # that first), and the proxy answers on the passed socket at once
                assert f"listening on http://127.0.0.1:{port}" in output()
                assert ready["READY"] == "1"
                assert ready["STATUS"] == f"serving 1 service(s) on http://127.0.0.1:{port}"
                async with asyncio.timeout(2.0):
                    status, body = await http_get(port, "/echo")
                assert status == 200 and b'"backend": "b0"' in body
                async with session.get(f"http://127.0.0.1:{metrics_port}/-/ready") as response:
                    assert response.status == 200

                # the watchdog: every half of WATCHDOG_USEC, from the ingress's loop
                loop = asyncio.get_running_loop()
                await wait_for(
                    lambda: loop.time() > ready_at + 1.0, timeout=2.0, what="a second of pings"
                )
                pings = [t for t, fields in notify.seen if fields.get("WATCHDOG") == "1"]
                assert len([t for t in pings if ready_at <= t <= ready_at + 1.0]) >= 3, pings
                gaps = [b - a for a, b in itertools.pairwise(pings)]
                assert min(gaps) >= 0.05, gaps
                assert 0.05 <= statistics.median(gaps) <= 0.3, gaps

                # SIGTERM with a request in flight: STOPPING=1, the request completes, exit 0
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /slow HTTP/1.1\r\nHost: e2e\r\n\r\n")
                await wait_for(lambda: backend.inflight == 1, what="the slow request at b0")
                process.send_signal(signal.SIGTERM)
                _, stopping = await notify.next_with("STOPPING")
                assert stopping == {"STOPPING": "1", "STATUS": "draining 1 connection(s)"}
                assert process.returncode is None, "exited with a request in flight"
                backend.release.set()
                async with asyncio.timeout(DEADLINE):
                    response_bytes = await reader.read()
                writer.close()
                assert response_bytes.startswith(b"HTTP/1.1 200 "), response_bytes
                assert response_bytes.endswith(b"slow from b0\n")
                async with asyncio.timeout(DEADLINE):
                    assert await process.wait() == 0, output()
                assert [fields for _, fields in notify.seen if "READY" in fields] == [ready]
            finally:
                if process is not None:
                    await stop(process)


async def test_https_socket_without_certificate_exits_1(short_dir: Path) -> None:
    """An fd named https with no TLS certificate configured: one clear line, exit 1."""
    log = short_dir / "ingress.log"
    with _listener() as listener:
        async with notify_reader(short_dir) as notify:
            process = await start_activated(
                listener,
                "https",
                notify.path,
                log,
                "--static-upstream",
                "127.0.0.1:9",
                "--metrics-listen",
                "off",
            )
            try:
                async with asyncio.timeout(READY_TIMEOUT):
                    assert await process.wait() == 1
            finally:
                await stop(process)
            assert "socket named 'https': it needs --tls-cert" in log.read_text()
            assert not any("READY" in fields for _, fields in notify.seen)
