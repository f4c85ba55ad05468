"""A small async HTTP/1.1 load generator: closed-loop clients on keep-alive connections,
following a schedule of phases, with every request's outcome kept.

Why not wrk or locust for `bench scaleout`: it needs a per-second time series of every request
with the exact kind of each failure (connection refused, reset, closed before the response,
timeout, the HTTP status), lined up second by second with the scaler's own view. wrk reports
totals per run; locust names exceptions per endpoint, not kinds per second. Both remain the
tools to point at a deployment (`bench/locustfile.py`, `bench/wrk-report.lua`).

The model:

- A **client** is one TCP connection carrying one request at a time, kept alive (a new
  connection only after the server closed one or a request failed). It sends its next request
  as soon as the previous one ended: a closed loop without think time, so N clients keep N
  requests in flight, which is how `max_concurrency` counts load.
- A **phase** says how many clients run at each moment: `idle` none, `step` its peak from
  its first moment, `ramp` from none up to its peak, linearly (`ceil(peak * t / duration)`).
- At a phase's end no new request starts; the requests in flight finish (each bounded by the
  request timeout) before the next phase begins. A request belongs to the phase it started in.

Error kinds (`RequestRecord.error`; None means a response with a status below 400):

| kind | what happened |
| --- | --- |
| `connect` | the TCP connect failed (refused, unreachable) |
| `timeout` | no complete response within the request timeout (connect included) |
| `reset` | the connection was reset, or broke, while sending or reading |
| `closed` | the server closed the connection before the response was complete |
| `protocol` | a response that is not valid HTTP/1.1 |
| `socket` | any other socket error (the detail says which) |
| `http NNN` | a complete response with status NNN >= 400 |

`Phase.clients_at` is pure and unit-tested; `LoadGenerator` is the asyncio shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11

__all__ = [
    "ERROR_KINDS",
    "IDLE",
    "KINDS",
    "RAMP",
    "STEP",
    "LoadGenerator",
    "Phase",
    "RequestRecord",
    "Span",
]

IDLE, STEP, RAMP = "idle", "step", "ramp"
KINDS = (IDLE, STEP, RAMP)
# The error kinds besides "http NNN"; see the module docstring.
ERROR_KINDS = ("connect", "timeout", "reset", "closed", "protocol", "socket")

_READ_SIZE = 65536
_DETAIL_BYTES = 200  # of an error response's body, kept as its detail
_TICK_S = 0.05  # how often a phase adjusts its number of clients
_DRAIN_SLACK_S = 2.0  # past the request timeout, before unfinished clients are cancelled


@dataclass(frozen=True, slots=True)
class Phase:
    """One part of the schedule: `kind` (idle, step, ramp) for `duration_s` seconds, with
    `clients` concurrent clients at its peak (0 for idle)."""

    name: str
    kind: str
    duration_s: float
    clients: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"phase kind must be one of {', '.join(KINDS)} (got {self.kind!r})")
        if self.duration_s < 0 or self.clients < 0:
            raise ValueError(f"phase {self.name}: negative duration or clients")
        if self.kind != IDLE and self.clients < 1:
            raise ValueError(f"phase {self.name}: a {self.kind} needs at least one client")

    def clients_at(self, t: float) -> int:
        """Clients that should be running `t` seconds into the phase (0 outside it)."""
        if self.kind == IDLE or t < 0 or t >= self.duration_s:
            return 0
        if self.kind == STEP:
            return self.clients
        # ramp: 0 at its first instant, one more every duration/clients seconds, the peak
        # during its last duration/clients seconds
        return min(self.clients, math.ceil(self.clients * t / self.duration_s))


@dataclass(frozen=True, slots=True)
class Span:
    """When a phase actually ran, in seconds since the run's start (a phase ends once its
    last request has finished, so it can last a little longer than planned)."""

    name: str
    kind: str
    start: float
    end: float
    clients: int

    def contains(self, t: float) -> bool:
        return self.start <= t < self.end


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request: when it started and ended (seconds since the run's start), its phase,
    and its outcome: a status, and an error kind unless it succeeded."""

    phase: str
    start: float
    end: float
    status: int | None = None
    error: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


class _Failed(Exception):
    """A request failed with this error kind."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    http: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def _connect(host: str, port: int) -> _Connection:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise _Failed("connect", f"{type(exc).__name__}: {exc}") from None
    return _Connection(reader, writer)


async def _exchange(conn: _Connection, request: h11.Request) -> tuple[int, bool, bytes]:
    """Send `request` and read the whole response: (status, reusable, start of the body)."""
    http = conn.http
    eof = False
    status = 0
    body = b""
    try:
        conn.writer.write(http.send(request) + http.send(h11.EndOfMessage()))
        await conn.writer.drain()
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(_READ_SIZE)
                eof = not data
                http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                if len(body) < _DETAIL_BYTES:
                    body += bytes(event.data[: _DETAIL_BYTES - len(body)])
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise _Failed("closed", "the server closed the connection before a response")
    except h11.RemoteProtocolError as exc:
        kind = "closed" if eof else "protocol"
        raise _Failed(kind, str(exc) or type(exc).__name__) from None
    except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as exc:
        raise _Failed("reset", f"{type(exc).__name__}: {exc}") from None
    except OSError as exc:
        raise _Failed("socket", f"{type(exc).__name__}: {exc}") from None
    reusable = http.our_state is h11.DONE and http.their_state is h11.DONE
    if reusable:
        http.start_next_cycle()
    return status, reusable, body


@dataclass(slots=True)
class _Client:
    task: asyncio.Task[None]
    stop: asyncio.Event


class LoadGenerator:
    """Clients against http://`host`:`port``path`, run phase by phase; every request's
    outcome is appended to `records`. Times are seconds since `start()`."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        request_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.request_timeout_s = request_timeout_s
        self.records: list[RequestRecord] = []
        self.spans: list[Span] = []
        self.phase = ""  # the phase running now ("" before the first)
        self._clock = clock
        self._t0 = clock()
        self._clients: list[_Client] = []
        self._request = h11.Request(
            method="GET",
            target=path,
            headers=[("Host", f"{host}:{port}"), ("User-Agent", "tidegate-bench-loadgen")],
        )

    def start(self) -> None:
        """Time zero of the run."""
        self._t0 = self._clock()

    def now(self) -> float:
        return self._clock() - self._t0

    @property
    def active(self) -> int:
        """Clients running now (not asked to stop)."""
        return sum(1 for c in self._clients if not c.stop.is_set())

    @property
    def in_flight(self) -> int:
        """Client tasks not finished yet, stopping ones included."""
        return sum(1 for c in self._clients if not c.task.done())

    async def run_phase(
        self,
        phase: Phase,
        until: Callable[[], bool] | None = None,
        max_extra_s: float = 0.0,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> Span:
        """Run `phase`; then, if given, await `then()`; then, if given `until`, go on until
        that is true, for at most `max_extra_s` more seconds. Returns when it actually ran."""
        start = self.now()
        self.phase = phase.name
        try:
            while (t := self.now() - start) < phase.duration_s:
                self._resize(phase.clients_at(t))
                await asyncio.sleep(min(_TICK_S, phase.duration_s - t))
            self._resize(0)
            await self._drain()
            if then is not None:
                await then()
            if until is not None:
                deadline = self.now() + max_extra_s
                while not until() and self.now() < deadline:
                    await asyncio.sleep(_TICK_S)
        finally:
            span = Span(phase.name, phase.kind, start, self.now(), phase.clients)
            self.spans.append(span)
        return span

    async def close(self) -> None:
        """Stop every client at once (cancelling requests in flight)."""
        for client in self._clients:
            client.stop.set()
            client.task.cancel()
        await asyncio.gather(*(c.task for c in self._clients), return_exceptions=True)
        self._clients.clear()

    def _resize(self, target: int) -> None:
        running = [c for c in self._clients if not c.stop.is_set()]
        for _ in range(target - len(running)):
            stop = asyncio.Event()
            task = asyncio.create_task(self._client(self.phase, stop))
            self._clients.append(_Client(task, stop))
        for client in running[target:]:
            client.stop.set()

    async def _drain(self) -> None:
        tasks = [c.task for c in self._clients]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self.request_timeout_s + _DRAIN_SLACK_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self._clients.clear()

    async def _client(self, phase: str, stop: asyncio.Event) -> None:
        conn: _Connection | None = None
        try:
            while not stop.is_set():
                start = self.now()
                status: int | None = None
                try:
                    async with asyncio.timeout(self.request_timeout_s):
                        if conn is None:
                            conn = await _connect(self.host, self.port)
                        status, reusable, body = await _exchange(conn, self._request)
                except _Failed as exc:
                    self._record(phase, start, None, exc.kind, exc.detail)
                    conn = _closed(conn)
                    continue
                except TimeoutError:
                    what = "connecting" if conn is None else "waiting for the response"
                    detail = f"no response within {self.request_timeout_s:g} s ({what})"
                    self._record(phase, start, None, "timeout", detail)
                    conn = _closed(conn)
                    continue
                if status >= 400:
                    text = body.decode("utf-8", "replace").strip()
                    self._record(phase, start, status, f"http {status}", text)
                else:
                    self._record(phase, start, status, None, "")
                if not reusable:
                    conn = _closed(conn)
        finally:
            _closed(conn)

    def _record(
        self, phase: str, start: float, status: int | None, error: str | None, detail: str
    ) -> None:
        self.records.append(RequestRecord(phase, start, self.now(), status, error, detail))


def _closed(conn: _Connection | None) -> _Connection | None:
    """Close `conn` if there is one; returns None, the client's next connection."""
    if conn is not None:
        conn.close()
    return None
