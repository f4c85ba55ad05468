"""The contract every Runtime passes (scaler/runtime.py), written once for all of them.

To run it for a runtime, subclass :class:`RuntimeHarness` (how to make the runtime, and specs
for a working app, a crashing app and a launch that must fail), then, in a test module::

    @pytest.fixture
    def harness(tmp_path: Path) -> RuntimeHarness:
        return MyHarness(tmp_path)

    class TestMyRuntimeContract(RuntimeContract):
        \"\"\"The shared Runtime contract, for my runtime.\"\"\"

The working app listens on the PORT its spec sets and answers ``GET /env`` with a JSON object
of its environment; a harness whose app answers differently overrides :meth:`app_env`. For
``logs()`` a harness starts an app that writes a few lines (:meth:`start_talking`). Every
test stops what it started on the way out, also when it fails, and waits on events or polls
with a deadline, never sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaler.runtime import InstanceInfo, LaunchError, LaunchSpec, LogLine, Runtime, RuntimeEvent

SERVICE = "svc"
EVENT_TIMEOUT = 15.0  # seconds for an expected event (a container's stop and removal included)


class RuntimeHarness:
    """What the contract needs from one runtime's test module."""

    start_timeout = 15.0  # seconds for a started app to answer on its address

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"

    def runtime(self) -> Runtime:
        """A new runtime object; a second one over the same state is a restarted scaler's."""
        raise NotImplementedError

    def app_spec(
        self, *, instance_id: str, env: dict[str, str], secret_names: tuple[str, ...]
    ) -> LaunchSpec:
        """A working app for SERVICE, with `env` plus the PORT it must listen on."""
        raise NotImplementedError

    def crash_spec(self, *, instance_id: str, exit_code: int) -> LaunchSpec:
        """An app for SERVICE that exits by itself with `exit_code` soon after it starts."""
        raise NotImplementedError

    def failing_spec(self, runtime: Runtime, *, instance_id: str) -> tuple[LaunchSpec, str]:
        """A spec `runtime` cannot start, and text its LaunchError must contain."""
        raise NotImplementedError

    async def start_crashing(
        self, runtime: Runtime, *, instance_id: str, exit_code: int
    ) -> InstanceInfo:
        """Starts an instance that then exits by itself with `exit_code`."""
        return await runtime.start(self.crash_spec(instance_id=instance_id, exit_code=exit_code))

    async def start_talking(
        self, runtime: Runtime, *, instance_id: str
    ) -> tuple[InstanceInfo, set[tuple[str, str]]]:
        """Starts an instance of SERVICE that writes a few lines and keeps running; returns it
        and the (stream, line) pairs it writes."""
        raise NotImplementedError

    async def check_answers(self, info: InstanceInfo) -> None:
        """Fails unless the instance accepts TCP connections on its address in time."""
        assert info.address is not None, info
        await wait_connectable(info.address, self.start_timeout)

    async def app_env(self, info: InstanceInfo) -> dict[str, str]:
        """The environment the running app sees, as it reports it."""
        assert info.address is not None, info
        await wait_connectable(info.address, self.start_timeout)
        status, body = await http_get(info.address, "/env")
        assert status == 200, (status, body)
        env = json.loads(body)
        assert isinstance(env, dict)
        return env

    def kill_leftovers(self) -> None:
        """A last resort after each test: kill whatever this runtime left running."""


class RuntimeContract:
    """The Runtime protocol's behaviour; subclasses get a `harness` fixture from their module."""

    async def test_start_returns_a_running_instance_that_answers(
        self, harness: RuntimeHarness
    ) -> None:
        """start() returns a running instance whose address accepts connections."""
        async with opened(harness) as runtime:
            spec = working_spec(harness)
            info = await runtime.start(spec)
            assert (info.instance_id, info.service, info.revision, info.state) == (
                spec.instance_id,
                spec.service,
                spec.revision,
                "running",
            )
            assert info.address is not None and info.address.startswith("127.0.0.1:")
            await harness.check_answers(info)
            assert summary(await runtime.inspect(spec.instance_id)) == summary(info)
            assert [summary(i) for i in await runtime.list()] == [summary(info)]

    async def test_env_reaches_the_app(self, harness: RuntimeHarness) -> None:
        """The app sees PORT, TIDEGATE_SERVICE, TIDEGATE_INSTANCE, plain env and a secret."""
        async with opened(harness) as runtime:
            secret = f"s3cret-{uuid.uuid4().hex}"
            spec = working_spec(harness, {"GREETING": "hello", "DB_PASSWORD": secret})
            seen = await harness.app_env(await runtime.start(spec))
            assert seen["PORT"] == spec.env["PORT"]
            assert seen["TIDEGATE_SERVICE"] == SERVICE
            assert seen["TIDEGATE_INSTANCE"] == spec.instance_id
            assert seen["GREETING"] == "hello"
            assert seen["DB_PASSWORD"] == secret

    async def test_stop_is_idempotent_and_removes(self, harness: RuntimeHarness) -> None:
        """stop() removes the instance with a "removed" event; again, or for an unknown id,
        it does nothing."""
        async with opened(harness) as runtime:
            events = runtime.events()
            spec = working_spec(harness)
            await harness.check_answers(await runtime.start(spec))
            await asyncio.gather(
                runtime.stop(spec.instance_id, grace=5.0), runtime.stop(spec.instance_id)
            )
            await next_event(events, "removed", spec.instance_id)
            assert await runtime.inspect(spec.instance_id) is None
            assert await runtime.list() == []
            await runtime.stop(spec.instance_id)
            await runtime.stop("svc-never-started")

    async def test_crash_yields_an_exited_event_with_its_code(
        self, harness: RuntimeHarness
    ) -> None:
        """An app that exits by itself yields "exited" with its exit code and stays listed as
        exited until stopped."""
        async with opened(harness) as runtime:
            events = runtime.events()
            instance_id = new_id()
            await harness.start_crashing(runtime, instance_id=instance_id, exit_code=3)
            event = await next_event(events, "exited", instance_id)
            assert (event.service, event.exit_code) == (SERVICE, 3)
            info = await runtime.inspect(instance_id)
            assert info is not None and (info.state, info.exit_code) == ("exited", 3)
            await runtime.stop(instance_id)
            await next_event(events, "removed", instance_id)
            assert await runtime.list() == []

    async def test_a_new_runtime_adopts_running_instances_once(
        self, harness: RuntimeHarness
    ) -> None:
        """A new runtime object over the same state lists each running instance exactly once,
        and can stop it."""
        async with opened(harness) as first:
            started = {}
            for _ in range(2):
                spec = working_spec(harness)
                info = await first.start(spec)
                await harness.check_answers(info)
                started[info.instance_id] = info
            async with opened(harness) as second:
                events = second.events()
                for _ in range(2):  # listing again must not duplicate anything
                    listed = await second.list()
                    assert sorted(i.instance_id for i in listed) == sorted(started)
                    for info in listed:
                        assert info.state == "running"
                        assert info.address == started[info.instance_id].address
                        assert info.service == SERVICE
                gone, kept = sorted(started)
                await second.stop(gone)
                await next_event(events, "removed", gone)
                assert [i.instance_id for i in await second.list()] == [kept]
                await harness.check_answers(started[kept])

    async def test_a_bad_launch_raises_launch_error(self, harness: RuntimeHarness) -> None:
        """A spec that cannot start raises LaunchError saying why, and leaves nothing listed."""
        async with opened(harness) as runtime:
            spec, expected = harness.failing_spec(runtime, instance_id=new_id())
            with pytest.raises(LaunchError) as raised:
                await runtime.start(spec)
            assert expected in str(raised.value)
            assert await runtime.list() == []

    async def test_a_duplicate_instance_id_is_refused(self, harness: RuntimeHarness) -> None:
        """Starting an id that is already running raises LaunchError and leaves the first be."""
        async with opened(harness) as runtime:
            spec = working_spec(harness)
            info = await runtime.start(spec)
            with pytest.raises(LaunchError, match=spec.instance_id):
                await runtime.start(spec)
            await harness.check_answers(info)
            assert [summary(i) for i in await runtime.list()] == [summary(info)]

    async def test_logs_give_the_output_and_end_once_it_is_stopped(
        self, harness: RuntimeHarness
    ) -> None:
        """logs() gives each line the app writes with its stream and a time, and a reader
        ends once the instance is stopped; an unknown id gives nothing."""
        async with opened(harness) as runtime:
            instance_id = new_id()
            info, expected = await harness.start_talking(runtime, instance_id=instance_id)
            assert info.state == "running", info
            seen: list[LogLine] = []

            async def read() -> None:
                async for line in runtime.logs(instance_id):
                    seen.append(line)

            reader = asyncio.ensure_future(read())
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + EVENT_TIMEOUT
                while not expected <= {(line.stream, line.line) for line in seen}:
                    if loop.time() > deadline or reader.done():
                        pytest.fail(f"expected {expected} from logs(), got {seen}")
                    await asyncio.sleep(0.02)
                assert all(line.time > 0 for line in seen)
                await runtime.stop(instance_id, grace=5.0)
                async with asyncio.timeout(EVENT_TIMEOUT):
                    await reader
            finally:
                reader.cancel()
            async with asyncio.timeout(EVENT_TIMEOUT):
                assert [line async for line in runtime.logs("svc-never-started")] == []

    async def test_events_end_when_the_runtime_closes(self, harness: RuntimeHarness) -> None:
        """Iterating events() ends once close() is called."""
        runtime = harness.runtime()
        events = runtime.events()

        async def drain() -> list[RuntimeEvent]:
            return [event async for event in events]

        draining = asyncio.ensure_future(drain())
        try:
            await runtime.close()
            async with asyncio.timeout(EVENT_TIMEOUT):
                assert await draining == []
        finally:
            draining.cancel()
            await runtime.close()


@contextlib.asynccontextmanager
async def opened(harness: RuntimeHarness) -> AsyncIterator[Runtime]:
    """A new runtime; on the way out, also on failure, every instance it lists is stopped."""
    runtime = harness.runtime()
    try:
        yield runtime
    finally:
        try:
            for info in await runtime.list():
                await runtime.stop(info.instance_id, grace=2.0)
            await runtime.close()
        finally:
            harness.kill_leftovers()


def summary(info: InstanceInfo | None) -> tuple[str, str, str, str | None] | None:
    """What two views of one instance must agree on (timestamps may be read differently)."""
    if info is None:
        return None
    return (info.instance_id, info.service, info.state, info.address)


def new_id() -> str:
    return f"{SERVICE}-{uuid.uuid4().hex[:8]}"


def working_spec(harness: RuntimeHarness, env: dict[str, str] | None = None) -> LaunchSpec:
    """The harness's working app under a new id, with what the scaler puts in every instance's
    environment (but PORT, which the harness sets), `env`, and DB_PASSWORD as the secret."""
    instance_id = new_id()
    return harness.app_spec(
        instance_id=instance_id,
        env={"TIDEGATE_SERVICE": SERVICE, "TIDEGATE_INSTANCE": instance_id, **(env or {})},
        secret_names=("DB_PASSWORD",),
    )


async def next_event(
    events: AsyncIterator[RuntimeEvent], kind: str, instance_id: str
) -> RuntimeEvent:
    """The next event of this kind for this instance, skipping others, within EVENT_TIMEOUT."""
    try:
        async with asyncio.timeout(EVENT_TIMEOUT):
            async for event in events:
                if (event.kind, event.instance_id) == (kind, instance_id):
                    return event
    except TimeoutError:
        pass
    pytest.fail(f"no {kind!r} event for {instance_id} within {EVENT_TIMEOUT} s")


async def wait_connectable(address: str, timeout: float) -> None:
    """Polls a TCP connect to `address` until it succeeds; fails after `timeout` seconds."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            if loop.time() > deadline:
                pytest.fail(f"nothing answered on {address} within {timeout} s")
            await asyncio.sleep(0.02)
        else:
            writer.close()
            return


async def http_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.0 GET: (status, body)."""
    host, _, port = address.rpartition(":")
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body
