"""An in-memory runtime for tests of the scaler's logic: no processes, no sockets, no files.

It keeps the Runtime protocol's semantics (ids are unique, stop is idempotent and yields
"removed", an instance that dies by itself yields "exited" and stays listed as exited until
stopped) and adds the handles a test needs:

- :meth:`FakeRuntime.fail_next_start` makes the next start raise :class:`LaunchError`;
- :meth:`FakeRuntime.crash` makes a running instance exit with a code, as if it had died;
- :meth:`FakeRuntime.write` makes an instance write a line of output, for :meth:`logs`;
- ``launched`` and ``stopped`` record what the scaler asked for, in order.

Addresses come from a counter, ``127.0.0.1:20000``, ``127.0.0.1:20001`` and so on; nothing
listens there. What survives a scaler restart lives in a :class:`FakeHost` (as containers
live in the Docker daemon): two runtimes over one host see the same instances, which is how a
test simulates adoption.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Literal

import msgspec

from scaler.runtime import (
    InstanceInfo,
    LaunchError,
    LaunchSpec,
    LogLine,
    LogStream,
    RuntimeEvent,
)
from scaler.runtimes._events import Closed, EventStream

__all__ = ["FakeHost", "FakeRuntime"]

FIRST_PORT = 20000  # the first fake address is 127.0.0.1:FIRST_PORT


class FakeHost:
    """The instances, shared by every FakeRuntime made over it."""

    def __init__(self) -> None:
        self.instances: dict[str, InstanceInfo] = {}
        self.started = 0  # how many instances were ever started: the address counter
        self.output: dict[str, list[LogLine]] = {}  # what each instance wrote, in order
        self._waiters: list[asyncio.Future[None]] = []

    async def changed(self) -> None:
        """Returns at the next output, exit or removal."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class FakeRuntime:
    """A Runtime in memory. `clock` gives `started_at` (wall-clock seconds)."""

    def __init__(
        self, host: FakeHost | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.host = host if host is not None else FakeHost()
        self.launched: list[LaunchSpec] = []  # every spec start() accepted, in order
        self.stopped: list[str] = []  # every id stop() removed, in order
        self._clock = clock
        self._failures: deque[str] = deque()
        self._events: asyncio.Queue[RuntimeEvent | Closed] = asyncio.Queue()
        self._closed = False

    def fail_next_start(self, message: str) -> None:
        """The next start() raises LaunchError(message); calls queue up, one per start."""
        self._failures.append(message)

    def crash(self, instance_id: str, exit_code: int = 1) -> None:
        """A running instance exits by itself with `exit_code`, yielding an "exited" event."""
        info = self.host.instances.get(instance_id)
        if info is None or info.state != "running":
            raise KeyError(f"no running instance {instance_id!r}")
        info = msgspec.structs.replace(info, state="exited", exit_code=exit_code)
        self.host.instances[instance_id] = info
        self._emit("exited", info)
        self.host.notify()

    def write(self, instance_id: str, line: str, stream: LogStream = "stdout") -> None:
        """A running instance writes ``line`` (at the clock's time now)."""
        info = self.host.instances.get(instance_id)
        if info is None or info.state != "running":
            raise KeyError(f"no running instance {instance_id!r}")
        self.host.output.setdefault(instance_id, []).append(LogLine(stream, line, self._clock()))
        self.host.notify()

    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        if self._closed:
            raise LaunchError(f"{spec.instance_id}: the runtime is closed")
        if self._failures:
            raise LaunchError(self._failures.popleft())
        if spec.instance_id in self.host.instances:
            raise LaunchError(f"{spec.instance_id}: an instance with this id already exists")
        info = InstanceInfo(
            instance_id=spec.instance_id,
            service=spec.service,
            revision=spec.revision,
            state="running",
            address=f"127.0.0.1:{FIRST_PORT + self.host.started}",
            started_at=self._clock(),
        )
        self.host.started += 1
        self.host.instances[spec.instance_id] = info
        self.launched.append(spec)
        return info

    async def stop(self, instance_id: str, *, grace: float = 10.0) -> None:
        if self._closed:
            raise LaunchError(f"{instance_id}: the runtime is closed")
        info = self.host.instances.pop(instance_id, None)
        if info is None:
            return
        self.stopped.append(instance_id)
        self._emit("removed", info)
        self.host.notify()

    async def list(self) -> list[InstanceInfo]:
        return list(self.host.instances.values())

    async def inspect(self, instance_id: str) -> InstanceInfo | None:
        return self.host.instances.get(instance_id)

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Exits and removals, until close(). One stream per runtime: consume it in one place."""
        return EventStream(self._events)

    def logs(self, instance_id: str, since: float | None = None) -> AsyncIterator[LogLine]:
        """What the instance wrote after ``since`` and writes from now on, until it has
        exited or been removed (or the runtime closes)."""
        return self._logs(instance_id, since)

    async def _logs(self, instance_id: str, since: float | None) -> AsyncIterator[LogLine]:
        given = 0
        while True:
            lines = self.host.output.get(instance_id, [])
            for line in lines[given:]:
                if since is None or line.time > since:
                    yield line
            given = len(lines)
            info = self.host.instances.get(instance_id)
            if self._closed or info is None or info.state != "running":
                return
            await self.host.changed()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.put_nowait(Closed())
            self.host.notify()

    def _emit(self, kind: Literal["exited", "removed"], info: InstanceInfo) -> None:
        if not self._closed:
            event = RuntimeEvent(
                kind=kind,
                instance_id=info.instance_id,
                service=info.service,
                exit_code=info.exit_code,
            )
            self._events.put_nowait(event)
