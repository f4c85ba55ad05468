"""DockerRuntime against the real engine, with the busybox images of tests/images.py.

First the shared Runtime contract (tests/runtime_contract.py) with the httpd image as the
working app, then what is Docker's own: labels, loopback-only publishing, limits, where a
secret may not appear, networks, errors, events from outside, adoption and scope labels. One
test drives the event stream with a fake engine client, to break it on purpose.

Each test gets its own service name (``tgtest-<random>``) and a runtime; on the way out, also
when the test fails, every container of that service is removed and the runtime closed. Waits
are on events or on a condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from scaler.runtime import (
    LABEL_INSTANCE,
    LABEL_PORT,
    LABEL_REVISION,
    LABEL_SERVICE,
    InstanceInfo,
    LaunchError,
    LaunchSpec,
    LogLine,
    RuntimeEvent,
)
from scaler.runtimes.docker import DockerRuntime
from tests.images import (  # images_fixture registers the `images` fixture here
    CRASH_CGI_EXIT,
    CRASH_EXIT,
    SERVICE_PREFIX,
    TEST_SCOPE,
    TestImages,
    images_fixture,  # noqa: F401
)
from tests.procs import free_port
from tests.runtime_contract import SERVICE, RuntimeContract, RuntimeHarness

pytestmark = [pytest.mark.docker, pytest.mark.slow]

DEADLINE = 15.0  # seconds for anything the engine does (start, exit, event delivery)
TEST_LABELS = [f"{k}={v}" for k, v in TEST_SCOPE.items()]
# the httpd image's own command (tests/images.py), for specs that print something first
_HTTPD_CMD = 'trap "exit 0" TERM; /bin/busybox httpd -f -p "$PORT" -h /www & wait $!'


class Scenario:
    """One test's service: builds its LaunchSpecs and reaches the engine directly to check."""

    def __init__(self, images: TestImages, client: Any) -> None:
        self.images = images
        self.client = client
        self.service = f"{SERVICE_PREFIX}{secrets.token_hex(4)}"
        self._count = 0

    def spec(self, image: str | None = None, **fields: Any) -> LaunchSpec:
        self._count += 1
        instance_id = fields.pop("instance_id", f"{self.service}-{self._count}")
        port = fields.pop("port", 8080)
        env = {
            "PORT": str(port),
            "TIDEGATE_SERVICE": self.service,
            "TIDEGATE_INSTANCE": instance_id,
            **fields.pop("env", {}),
        }
        fields.setdefault("memory", 64_000_000)
        return LaunchSpec(
            service=self.service,
            revision="rev1",
            instance_id=instance_id,
            image=image or self.images.httpd,
            env=env,
            port=port,
            **fields,
        )

    def attrs(self, instance_id: str) -> dict[str, Any]:
        """The container's inspect document, read outside the runtime."""
        return dict(self.client.containers.get(f"tidegate-{instance_id}").attrs)

    def containers(self) -> list[Any]:
        return list(
            self.client.containers.list(
                all=True, filters={"label": f"{LABEL_SERVICE}={self.service}"}
            )
        )

    def remove_all(self) -> None:
        for container in self.containers():
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)


@pytest.fixture
def scenario(images: TestImages) -> Iterator[Scenario]:
    import docker

    client = docker.from_env()
    h = Scenario(images, client)
    try:
        yield h
    finally:
        h.remove_all()
        client.close()


@pytest.fixture
async def runtime(scenario: Scenario) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(scope_labels=TEST_SCOPE)
    try:
        yield rt
    finally:
        await asyncio.to_thread(scenario.remove_all)
        await rt.close()


async def http_get(address: str, path: str = "/", timeout: float = DEADLINE) -> tuple[int, str]:
    """GET `path` from `address` once it answers (the app may not listen yet): status, body."""
    host, _, port = address.rpartition(":")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
                async with asyncio.timeout(timeout):
                    data = await reader.read()
            finally:
                writer.close()
            if data.startswith(b"HTTP/"):
                head, _, body = data.partition(b"\r\n\r\n")
                return int(head.split()[1]), body.decode(errors="replace")
        except OSError:
            pass  # docker-proxy resets until the app listens; nothing listening at all yet
        if loop.time() > deadline:
            pytest.fail(f"{address}{path} did not answer within {timeout}s")
        await asyncio.sleep(0.02)


async def next_event(
    events: AsyncIterator[RuntimeEvent],
    match: Callable[[RuntimeEvent], bool],
    timeout: float = DEADLINE,
) -> RuntimeEvent:
    """The first event that matches, skipping others; fails past the deadline."""
    try:
        async with asyncio.timeout(timeout):
            async for event in events:
                if match(event):
                    return event
    except TimeoutError:
        pass
    pytest.fail(f"no matching runtime event within {timeout}s")


def exited(instance_id: str) -> Callable[[RuntimeEvent], bool]:
    return lambda e: e.kind == "exited" and e.instance_id == instance_id


def removed(instance_id: str) -> Callable[[RuntimeEvent], bool]:
    return lambda e: e.kind == "removed" and e.instance_id == instance_id


# -- the shared Runtime contract -------------------------------------------------------------


class DockerHarness(RuntimeHarness):
    """The contract's harness for DockerRuntime: the httpd image is the working app."""

    def __init__(self, tmp_path: Path, images: TestImages) -> None:
        super().__init__(tmp_path)
        self.images = images

    def runtime(self) -> DockerRuntime:
        return DockerRuntime(scope_labels=TEST_SCOPE)

    def app_spec(
        self, *, instance_id: str, env: dict[str, str], secret_names: tuple[str, ...]
    ) -> LaunchSpec:
        return LaunchSpec(
            service=SERVICE,
            revision="rev1",
            instance_id=instance_id,
            image=self.images.httpd,
            env={**env, "PORT": "8080"},
            port=8080,
            memory=64_000_000,
            secret_names=secret_names,
        )

    def crash_spec(self, *, instance_id: str, exit_code: int) -> LaunchSpec:
        spec = self.app_spec(instance_id=instance_id, env={}, secret_names=())
        return msgspec.structs.replace(
            spec, command=("/bin/busybox", "sh", "-c", f"exit {exit_code}")
        )

    def failing_spec(self, runtime: Any, *, instance_id: str) -> tuple[LaunchSpec, str]:
        spec = self.app_spec(instance_id=instance_id, env={}, secret_names=())
        image = f"{SERVICE_PREFIX}missing/image:{secrets.token_hex(4)}"
        return msgspec.structs.replace(spec, image=image), f"image {image} not found locally"

    async def check_answers(self, info: InstanceInfo) -> None:
        # A TCP connect is not enough here: docker-proxy accepts before the app listens.
        assert info.address is not None, info
        assert (await http_get(info.address, timeout=self.start_timeout))[0] == 200

    async def app_env(self, info: InstanceInfo) -> dict[str, str]:
        assert info.address is not None, info
        status, body = await http_get(info.address, "/cgi-bin/env", self.start_timeout)
        assert status == 200, (status, body)
        return dict(line.partition("=")[::2] for line in body.splitlines())

    async def start_talking(
        self, runtime: Any, *, instance_id: str
    ) -> tuple[InstanceInfo, set[tuple[str, str]]]:
        spec = self.app_spec(instance_id=instance_id, env={}, secret_names=())
        words = "echo to stdout; echo to stderr >&2; "
        command = ("/bin/busybox", "sh", "-c", words + _HTTPD_CMD)
        info = await runtime.start(msgspec.structs.replace(spec, command=command))
        return info, {("stdout", "to stdout"), ("stderr", "to stderr")}

    def kill_leftovers(self) -> None:
        import docker

        # Only the contract's own service: another test run's containers carry the test
        # scope too, and may be in use right now.
        with contextlib.closing(docker.from_env()) as client:
            for container in client.containers.list(
                all=True, filters={"label": [f"{LABEL_SERVICE}={SERVICE}", *TEST_LABELS]}
            ):
                with contextlib.suppress(docker.errors.APIError):
                    container.remove(force=True, v=True)


@pytest.fixture
def harness(tmp_path: Path, images: TestImages) -> DockerHarness:
    return DockerHarness(tmp_path, images)


class TestDockerRuntimeContract(RuntimeContract):
    """The shared Runtime contract, for DockerRuntime on the local engine."""


# -- starting: what the container gets ---------------------------------------------------------


async def test_start_serves_on_loopback_with_labels(runtime: DockerRuntime, scenario: Scenario):
    """A started instance carries the contract's labels and answers on a 127.0.0.1-only port."""
    spec = scenario.spec()
    info = await runtime.start(spec)
    assert info.state == "running"
    assert info.instance_id == spec.instance_id and info.service == scenario.service
    assert info.revision == "rev1" and info.started_at > time.time() - 60
    assert info.address is not None and info.address.startswith("127.0.0.1:")
    status, body = await http_get(info.address)
    assert (status, body) == (200, "tidegate test httpd\n")
    status, body = await http_get(info.address, "/cgi-bin/env")
    assert status == 200
    assert f"TIDEGATE_INSTANCE={spec.instance_id}" in body.splitlines()

    attrs = scenario.attrs(spec.instance_id)
    assert attrs["Config"]["Labels"] == {
        **TEST_SCOPE,
        LABEL_SERVICE: scenario.service,
        LABEL_REVISION: "rev1",
        LABEL_INSTANCE: spec.instance_id,
        LABEL_PORT: "8080",
    }
    assert attrs["HostConfig"]["PortBindings"] == {
        "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": ""}]
    }
    published = attrs["NetworkSettings"]["Ports"]["8080/tcp"]
    assert [b["HostIp"] for b in published] == ["127.0.0.1"]
    assert info.address == f"127.0.0.1:{published[0]['HostPort']}"


async def test_limits_and_no_new_privileges(runtime: DockerRuntime, scenario: Scenario):
    """cpu becomes NanoCpus, memory a hard limit with no extra swap; no-new-privileges is set."""
    spec = scenario.spec(cpu=0.25, memory=96_000_000)
    await runtime.start(spec)
    host = scenario.attrs(spec.instance_id)["HostConfig"]
    assert host["NanoCpus"] == 250_000_000
    assert host["Memory"] == 96_000_000
    assert host["MemorySwap"] == 96_000_000
    assert host["SecurityOpt"] == ["no-new-privileges"]


async def test_secret_reaches_app_but_not_labels_or_command(
    runtime: DockerRuntime, scenario: Scenario
):
    """A secret is in the app's environment, and in no label, name or command-line field."""
    secret = f"s3cr3t-{secrets.token_hex(8)}"
    spec = scenario.spec(env={"DB_PASSWORD": secret}, secret_names=("DB_PASSWORD",))
    info = await runtime.start(spec)
    assert info.address is not None
    _, body = await http_get(info.address, "/cgi-bin/env")
    assert f"DB_PASSWORD={secret}" in body.splitlines()

    attrs = scenario.attrs(spec.instance_id)
    config = attrs["Config"]
    exposed = [
        *config["Labels"].keys(),
        *config["Labels"].values(),
        *(config["Cmd"] or []),
        *(config["Entrypoint"] or []),
        attrs["Path"],
        *attrs["Args"],
        attrs["Name"],
    ]
    assert not [field for field in exposed if secret in field]


async def test_command_overrides_cmd_and_stop_kills_after_grace(
    runtime: DockerRuntime, scenario: Scenario
):
    """spec.command replaces CMD; a PID 1 that ignores SIGTERM is killed once grace runs out."""
    # `sleep` as PID 1 has no handler, so SIGTERM does nothing to it (pid_namespaces(7)).
    spec = scenario.spec(scenario.images.never_listens, command=("/bin/busybox", "sleep", "600"))
    await runtime.start(spec)
    assert scenario.attrs(spec.instance_id)["Config"]["Cmd"] == list(spec.command)
    began = time.monotonic()
    await runtime.stop(spec.instance_id, grace=1)
    took = time.monotonic() - began
    assert 0.9 < took < DEADLINE
    assert scenario.containers() == []
    assert await runtime.inspect(spec.instance_id) is None


async def test_stop_is_prompt_and_idempotent(runtime: DockerRuntime, scenario: Scenario):
    """An app that exits on SIGTERM stops well inside its grace; stopping again, or an unknown
    id, is a no-op."""
    spec = scenario.spec()
    await runtime.start(spec)
    began = time.monotonic()
    await runtime.stop(spec.instance_id, grace=10)
    assert time.monotonic() - began < 5
    assert scenario.containers() == []
    await runtime.stop(spec.instance_id)
    await runtime.stop(f"{scenario.service}-never-started")


async def test_host_network_mode(runtime: DockerRuntime, scenario: Scenario):
    """With host networking the instance listens on the host's PORT and is reached there."""
    port = free_port()
    spec = scenario.spec(network_mode="host", port=port)
    info = await runtime.start(spec)
    assert info.address == f"127.0.0.1:{port}"
    assert scenario.attrs(spec.instance_id)["HostConfig"]["NetworkMode"] == "host"
    assert (await http_get(info.address))[0] == 200


async def test_extra_network_is_joined(runtime: DockerRuntime, scenario: Scenario):
    """An instance joins the extra networks its spec names, besides the default bridge."""
    name = f"{scenario.service}-net"
    network = scenario.client.networks.create(name, labels={LABEL_SERVICE: scenario.service})
    try:
        spec = scenario.spec(networks=(name,))
        info = await runtime.start(spec)
        attached = scenario.attrs(spec.instance_id)["NetworkSettings"]["Networks"]
        assert set(attached) == {"bridge", name}
        assert info.address is not None and (await http_get(info.address))[0] == 200
    finally:
        scenario.remove_all()
        network.remove()


# -- failing to start ----------------------------------------------------------------------------


async def test_missing_image_fails_without_pulling(scenario: Scenario):
    """A missing image is a LaunchError naming it; the engine is never asked to pull."""
    import docker

    pulls: list[tuple[Any, ...]] = []

    def client_factory() -> Any:
        client = docker.from_env()
        client.api.pull = lambda *args, **kwargs: pulls.append(args)
        return client

    runtime = DockerRuntime(client_factory=client_factory, scope_labels=TEST_SCOPE)
    image = f"{SERVICE_PREFIX}missing/image:{secrets.token_hex(4)}"
    try:
        with pytest.raises(LaunchError, match=rf"image {image} not found locally"):
            await runtime.start(scenario.spec(image))
    finally:
        await runtime.close()
    assert pulls == []
    assert scenario.containers() == []


async def test_missing_network_fails_naming_it(runtime: DockerRuntime, scenario: Scenario):
    """An extra network that does not exist is a LaunchError naming it; no container is left."""
    name = f"{scenario.service}-no-such-net"
    with pytest.raises(LaunchError, match=rf"network {name} not found"):
        await runtime.start(scenario.spec(networks=(name,)))
    assert scenario.containers() == []


async def test_bad_command_fails_and_leaves_nothing(runtime: DockerRuntime, scenario: Scenario):
    """A command the engine cannot exec is a LaunchError, and its container is removed."""
    with pytest.raises(LaunchError, match="cannot start its container"):
        await runtime.start(scenario.spec(command=("/no/such/binary",)))
    assert scenario.containers() == []


async def test_unreachable_engine_is_a_launch_error(scenario: Scenario, tmp_path: Path):
    """An engine that does not answer gives a LaunchError saying so, not an SDK exception."""
    import docker

    socket = tmp_path / "no-docker.sock"
    runtime = DockerRuntime(lambda: docker.DockerClient(base_url=f"unix://{socket}"))
    try:
        with pytest.raises(LaunchError, match="cannot reach the Docker engine"):
            await runtime.start(scenario.spec())
        with pytest.raises(LaunchError, match="cannot reach the Docker engine"):
            await runtime.list()
    finally:
        await runtime.close()


# -- events ------------------------------------------------------------------------------------


async def test_crash_image_yields_exit_code(runtime: DockerRuntime, scenario: Scenario):
    """A container that exits by itself yields an exited event with its code, then removed
    after stop; events come even though iteration began after the start."""
    events = runtime.events()
    spec = scenario.spec(scenario.images.crash)
    await runtime.start(spec)
    event = await next_event(events, exited(spec.instance_id))
    assert (event.service, event.exit_code) == (scenario.service, CRASH_EXIT)
    info = await runtime.inspect(spec.instance_id)
    assert info is not None
    assert (info.state, info.exit_code, info.address) == ("exited", CRASH_EXIT, None)
    await runtime.stop(spec.instance_id)
    await next_event(events, removed(spec.instance_id))


async def test_crash_cgi_exits_the_container(runtime: DockerRuntime, scenario: Scenario):
    """The httpd image's /cgi-bin/crash makes its container exit (code 70), seen as an event."""
    events = runtime.events()
    spec = scenario.spec()
    info = await runtime.start(spec)
    assert info.address is not None
    await http_get(info.address, "/cgi-bin/crash")
    event = await next_event(events, exited(spec.instance_id))
    assert event.exit_code == CRASH_CGI_EXIT


async def test_docker_kill_from_outside_yields_exit(runtime: DockerRuntime, scenario: Scenario):
    """`docker kill` by someone else is seen: an exited event (137, SIGKILL) and state exited."""
    events = runtime.events()
    spec = scenario.spec()
    await runtime.start(spec)
    scenario.client.containers.get(f"tidegate-{spec.instance_id}").kill()
    event = await next_event(events, exited(spec.instance_id))
    assert event.exit_code == 137
    info = await runtime.inspect(spec.instance_id)
    assert info is not None and info.state == "exited"


async def test_close_ends_event_iteration(scenario: Scenario):
    """close() ends an event iterator that is waiting, promptly, and its thread with it."""
    runtime = DockerRuntime(scope_labels=TEST_SCOPE)
    events = runtime.events()
    waiting = asyncio.ensure_future(anext(events, None))
    await asyncio.sleep(0)  # let the iterator subscribe and block
    async with asyncio.timeout(DEADLINE):
        await runtime.close()
        assert await waiting is None


# -- adoption ------------------------------------------------------------------------------------


async def test_new_runtime_adopts_running_instance(runtime: DockerRuntime, scenario: Scenario):
    """A second runtime (a restarted scaler) lists the running instance exactly once, reachable
    at the same address, and can stop it."""
    spec = scenario.spec()
    started = await runtime.start(spec)
    adopter = DockerRuntime(scope_labels=TEST_SCOPE)
    try:
        mine = [i for i in await adopter.list() if i.service == scenario.service]
        assert [(i.instance_id, i.state, i.address) for i in mine] == [
            (spec.instance_id, "running", started.address)
        ]
        assert mine[0].revision == "rev1"
        assert await adopter.inspect(spec.instance_id) == mine[0]
        await adopter.stop(spec.instance_id, grace=5)
        assert [i for i in await runtime.list() if i.service == scenario.service] == []
    finally:
        await adopter.close()


async def test_scope_labels_keep_runtimes_apart(runtime: DockerRuntime, scenario: Scenario):
    """A runtime with other scope labels neither lists, inspects, stops nor hears of the
    instances of this one."""
    spec = scenario.spec()
    await runtime.start(spec)
    other = DockerRuntime(scope_labels={"tidegate.test": "someone-else"})
    try:
        theirs, mine = other.events(), runtime.events()
        heard = asyncio.ensure_future(collect(theirs))  # follows from now until close()
        assert [i for i in await other.list() if i.service == scenario.service] == []
        assert await other.inspect(spec.instance_id) is None
        await other.stop(spec.instance_id, grace=0)
        info = await runtime.inspect(spec.instance_id)
        assert info is not None and info.state == "running"
        await runtime.stop(spec.instance_id, grace=5)
        await next_event(mine, removed(spec.instance_id))
        # The engine sent that removal to every subscriber it matched; the other had none.
        await other.close()
        async with asyncio.timeout(DEADLINE):
            assert [e for e in await heard if e.instance_id == spec.instance_id] == []
    finally:
        await other.close()


# -- output ----------------------------------------------------------------------------------------


async def test_logs_since_gives_only_later_lines_of_both_streams(
    runtime: DockerRuntime, scenario: Scenario
):
    """Lines carry the engine's time and their stream; logs(since=t), as after a scaler
    restart, gives only lines written after t, of both streams, in order; a reader ends when
    the container is stopped."""
    ticker = (
        "i=0; while :; do echo out $i; echo err $i >&2; i=$((i+1)); /bin/busybox usleep 20000; done"
    )
    spec = scenario.spec(
        scenario.images.never_listens, command=("/bin/busybox", "sh", "-c", ticker)
    )
    await runtime.start(spec)
    first: list[LogLine] = []
    reader = runtime.logs(spec.instance_id)
    async with asyncio.timeout(DEADLINE):
        async for line in reader:
            first.append(line)
            if len(first) == 10:
                break
    await reader.aclose()  # type: ignore[attr-defined]
    assert {line.stream for line in first} == {"stdout", "stderr"}
    for stream, word in (("stdout", "out"), ("stderr", "err")):
        numbers = [int(x.line.split()[1]) for x in first if x.stream == stream]
        assert all(x.line.startswith(word) for x in first if x.stream == stream)
        assert numbers == list(range(len(numbers))), "from the start, in order"
    since = first[5].time
    later: list[LogLine] = []

    async def read_on() -> None:
        async for line in runtime.logs(spec.instance_id, since):
            later.append(line)

    reading = asyncio.ensure_future(read_on())
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while len({x.stream for x in later}) < 2 or len(later) < 6:
            assert loop.time() < deadline and not reading.done(), later
            await asyncio.sleep(0.02)
        assert all(x.time > since for x in later)
        assert later[0].line not in {x.line for x in first[:6] if x.stream == later[0].stream}
        await runtime.stop(spec.instance_id, grace=1)
        async with asyncio.timeout(DEADLINE):
            await reading
    finally:
        reading.cancel()


async def test_logs_give_every_line_of_one_write(runtime: DockerRuntime, scenario: Scenario):
    """Lines the app writes at once share the engine's timestamp: all of them arrive, and the
    last one without a newline too, once the container has exited."""
    script = "printf 'a\\nb\\nc\\n'; printf 'no newline' >&2"
    spec = scenario.spec(
        scenario.images.never_listens, command=("/bin/busybox", "sh", "-c", script)
    )
    await runtime.start(spec)
    async with asyncio.timeout(DEADLINE):
        lines = [(x.stream, x.line) async for x in runtime.logs(spec.instance_id)]
    assert lines == [("stdout", "a"), ("stdout", "b"), ("stdout", "c"), ("stderr", "no newline")]


async def collect(events: AsyncIterator[RuntimeEvent]) -> list[RuntimeEvent]:
    return [event async for event in events]


class _FlakyEngine:
    """Clients whose event streams replay `batches` one per connection, each then breaking."""

    def __init__(self, batches: list[list[dict[str, Any]]]) -> None:
        self.batches = batches
        self.since: list[Any] = []

    def client(self) -> Any:
        engine = self

        class Client:
            def events(self, since: Any, **kwargs: Any) -> Any:
                engine.since.append(since)
                batch = engine.batches.pop(0) if engine.batches else []
                return _ClosableIter(batch, forever=not engine.batches and not batch)

            def close(self) -> None:
                pass

        return Client()


class _ClosableIter:
    """An event stream: yields its batch, then ends (a broken stream), or blocks until closed."""

    def __init__(self, batch: list[dict[str, Any]], forever: bool) -> None:
        self._items = iter(batch)
        self._forever = forever
        self._closed = threading.Event()

    def __iter__(self) -> _ClosableIter:
        return self

    def __next__(self) -> dict[str, Any]:
        item = next(self._items, None)
        if item is not None:
            return item
        if self._forever:
            self._closed.wait()
        raise StopIteration

    def close(self) -> None:
        self._closed.set()


def _raw(action: str, nano: int, instance_id: str, code: str = "0") -> dict[str, Any]:
    attributes = {LABEL_SERVICE: "svc", LABEL_INSTANCE: instance_id, "exitCode": code}
    return {
        "Action": action,
        "timeNano": nano,
        "Actor": {"ID": instance_id, "Attributes": attributes},
    }


async def test_event_stream_resumes_after_a_break_without_repeats():
    """When the engine's stream breaks, following resumes from the last event seen, and the
    engine's replay of it is not delivered twice."""
    first, second = (
        _raw("die", 1_500_000_000_000_000_007, "a", "3"),
        _raw("destroy", 1_500_000_001_000_000_000, "a"),
    )
    engine = _FlakyEngine([[first], [first, second]])
    runtime = DockerRuntime(engine.client)
    events = runtime.events()
    try:
        got = [await next_event(events, lambda e: True) for _ in range(2)]
        assert [(e.kind, e.instance_id, e.exit_code) for e in got] == [
            ("exited", "a", 3),
            ("removed", "a", None),
        ]
        assert engine.since[1] == "1500000000.000000007"
    finally:
        await runtime.close()
