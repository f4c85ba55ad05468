"""Acceptance: the command line on real containers, as a user runs it.

`tidegate up`, `tidegate ingress` + `tidegate scaler`, and `tidegate status`, `apply`,
`pause`, `resume` run as child processes against the local engine, with the busybox images of
tests/images.py (and a counting one built here). What is checked is what a user sees: HTTP
answers, `docker ps --filter label=tidegate.service=NAME` (through the SDK), `tidegate status
--json` and the daemons' logs:

1. scale to zero and back: cold starts, idle scale-down, pause and resume;
2. a burst from zero: no failed request, never more than ``max_size`` instances and never
   more than ``max_concurrency`` requests inside one instance (counted by the app itself);
3. ``docker kill`` under load: the instance is replaced, and only its requests may fail;
4. the standalone scaler restarted under load: no request fails, and the new scaler adopts
   exactly the containers that were running;
5. errors: a bad file (apply), an image that does not exist, an app that exits at once, an
   app that never listens (also behind Docker's userland proxy, which accepts connections on
   a published port with nothing listening behind it); the other service keeps serving.

The daemons' Docker runtimes are scoped to each test (tests/scaler_procs.py explains why);
every container a test starts is removed on the way out, also when it fails, by its scope
label. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from scaler.api import ScalerClient
from tests.images import (  # images_fixture registers the `images` fixture here
    _BB,
    _BUILD_OPTIONS,
    _CGI_HEAD,
    _HTTPD_FILES,
    _IMAGES,
    BUSYBOX,
    CRASH_EXIT,
    REPOSITORY,
    SERVICE_PREFIX,
    TestImages,
    _context,
    images_fixture,  # noqa: F401
)
from tests.procs import REPO, free_port
from tests.scaler_procs import (
    RUN_LABEL,
    Daemon,
    daemon,
    run_scope,
    short_tmpdir,
    tidegate_up,
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

_T = TypeVar("_T")

SCALE_DOWN_DELAY = 2.0  # seconds; the services' autoscaling.scale_down_delay
DEADLINE = 20.0  # seconds for anything the scaler and the engine do (start, replace, drain)
CLI_TIMEOUT = 20.0  # seconds for a `tidegate status/apply/pause/resume` to exit
REQUEST_TIMEOUT = 60.0  # seconds for one client request (the queue holds up to 60 s)
# health_check.start_timeout of the never-listening service: how long it may try to start
START_TIMEOUT = 5.0

# -- the counting image: busybox httpd plus a CGI that counts its own concurrent runs --------

_SHM = "/dev/shm"  # a writable tmpfs in every container, even FROM scratch
_COUNT_CGI = (
    _CGI_HEAD
    + 'ms="${QUERY_STRING#*ms=}"; ms="${ms%%&*}"; [ -n "$ms" ] || ms=0\n'
    # a lock by mkdir, which is atomic; the count and the maximum live in /dev/shm
    + f"lock() {{ until {_BB} mkdir {_SHM}/lock 2>/dev/null; do {_BB} usleep 1000; done; }}\n"
    + f"unlock() {{ {_BB} rmdir {_SHM}/lock; }}\n"
    + "lock\n"
    + f'now=$(( $({_BB} cat {_SHM}/cur 2>/dev/null || echo 0) + 1 ))\necho "$now" > {_SHM}/cur\n'
    + f"max=$({_BB} cat {_SHM}/max 2>/dev/null || echo 0)\n"
    + f'if [ "$now" -gt "$max" ]; then max=$now; echo "$max" > {_SHM}/max; fi\n'
    + "unlock\n"
    + f'{_BB} usleep "$(( ms * 1000 ))"\n'
    + "lock\n"
    + f'echo "$(( $({_BB} cat {_SHM}/cur) - 1 ))" > {_SHM}/cur\n'
    + "unlock\n"
    + 'echo "concurrent=$now max=$max instance=$TIDEGATE_INSTANCE"\n'
)
_CONCURRENT = re.compile(r"concurrent=(\d+) max=(\d+) instance=(\S+)")


def build_counter_image(client: Any) -> str:
    """httpd with /cgi-bin/count?ms=N: it holds the request N ms and answers how many requests
    were inside this instance when it came in (itself included) and the most seen so far."""
    import docker.errors

    dockerfile, _ = _IMAGES["httpd"]
    files = {**_HTTPD_FILES, "www/cgi-bin/count": _COUNT_CGI}
    context = _context(dockerfile, files, BUSYBOX.read_bytes())
    digest = hashlib.sha256(context + repr(sorted(_BUILD_OPTIONS.items())).encode())
    tag = f"{REPOSITORY}/counter:{digest.hexdigest()[:16]}"
    try:
        client.images.get(tag)
    except docker.errors.ImageNotFound:
        client.images.build(
            fileobj=io.BytesIO(context), custom_context=True, tag=tag, **_BUILD_OPTIONS
        )
    return tag


@pytest.fixture(scope="module")
def counter_image(images: TestImages) -> Iterator[str]:
    import docker

    client = docker.from_env(timeout=60)
    try:
        yield build_counter_image(client)
    finally:
        client.close()


# -- one test's world: service files, daemons, the engine, the CLI ----------------------------


@dataclass
class Cli:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class World:
    """One test's files, sockets, scope and engine client; removes its containers at the end."""

    images: TestImages
    client: Any
    scope: dict[str, str]
    files: Path  # service files and daemon logs
    sockets: Path  # unix sockets and state (a short path)

    def name(self, role: str) -> str:
        return f"{SERVICE_PREFIX}{role}-{secrets.token_hex(3)}"

    def service_file(
        self,
        name: str,
        image: str,
        *,
        min_size: int = 0,
        max_size: int = 4,
        max_concurrency: int = 2,
        domains: tuple[str, ...] = (),
        file: str | None = None,
        **overrides: Any,
    ) -> Path:
        """A docker service file: bridge network, http health check on /, a 2 s scale-down
        delay and a 60 s queue; ``overrides`` replace whole top-level keys."""
        doc: dict[str, Any] = {
            "name": name,
            "runtime": "docker",
            "image": image,
            "port": 8080,
            "instance": {"cpu": 0.5, "memory": "64MB"},
            "autoscaling": {
                "min_size": min_size,
                "max_size": max_size,
                "max_concurrency": max_concurrency,
                "scale_down_delay": f"{SCALE_DOWN_DELAY:g}s",
            },
            # http, not tcp: with Docker's userland proxy a published port accepts connections
            # even when nothing listens in the container (see the tcp test at the end)
            "health_check": {"protocol": "http", "path": "/", "interval": "1s", "timeout": "500ms"},
            "queue": {"max_length": 1000, "timeout": "60s"},
            "network": {"mode": "bridge"},
        }
        if domains:
            doc["domains"] = list(domains)
        doc.update(overrides)
        path = self.files / (file or f"{name}.yaml")
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def up(self, files: list[Path]) -> contextlib.AbstractAsyncContextManager[Daemon]:
        return tidegate_up(files, sockets=self.sockets, logs=self.files, scope=self.scope)

    async def containers(self, service: str) -> list[Any]:
        """`docker ps -a --filter label=tidegate.service=SERVICE`, through the SDK."""
        return await asyncio.to_thread(
            self.client.containers.list,
            all=True,
            filters={"label": f"tidegate.service={service}"},
            ignore_removed=True,
        )

    async def instance_ids(self, service: str) -> set[str]:
        return {c.labels["tidegate.instance"] for c in await self.containers(service)}

    def remove_all(self) -> None:
        """Every container of this test (its scope label), whatever state it is in."""
        for container in self.client.containers.list(
            all=True, filters={"label": f"{RUN_LABEL}={self.scope[RUN_LABEL]}"}
        ):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)


@pytest.fixture
def world(images: TestImages, tmp_path: Path) -> Iterator[World]:
    import docker

    client = docker.from_env(timeout=60)
    try:
        with short_tmpdir() as sockets:
            w = World(images, client, run_scope(), tmp_path, sockets)
            try:
                yield w
            finally:
                w.remove_all()
                for log in sorted(tmp_path.glob("*.log")):  # shown when the test failed
                    print(f"--- {log.name} ---\n{log.read_text(errors='replace')[-8000:]}")
    finally:
        client.close()


async def tidegate(*args: str, timeout: float = CLI_TIMEOUT) -> Cli:
    """Run `tidegate ARGS...` to its exit, without blocking the loop (load may be running)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tidegate",
        *args,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"tidegate {' '.join(args)} did not exit within {timeout} s")
    assert process.returncode is not None
    return Cli(process.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


async def status_json(socket: Path, service: str) -> dict[str, Any]:
    """`tidegate status SERVICE --json`: the service's entry."""
    result = await tidegate("status", service, "--json", "--socket", str(socket))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    (entry,) = report["services"]
    assert entry["name"] == service
    return dict(entry)


async def quick_status(socket: Path, service: str) -> dict[str, Any]:
    """The same report through the scaler's API client in this process: cheap enough to
    sample every few tens of milliseconds."""
    import msgspec

    client = ScalerClient(str(socket))
    try:
        report = await client.status(service)
    finally:
        await client.close()
    return dict(msgspec.to_builtins(report.services[0]))


async def poll(
    fetch: Callable[[], Awaitable[_T]],
    ok: Callable[[_T], bool],
    what: str,
    *,
    timeout: float = DEADLINE,
    interval: float = 0.1,
    log: Daemon | None = None,
) -> _T:
    """Fetch until ``ok`` holds; fail with the last value seen (and the daemon's log) past the
    deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fetch()
        if ok(value):
            return value
        if loop.time() > deadline:
            tail = f"\n--- {log.name} log ---\n{log.output()[-6000:]}" if log else ""
            pytest.fail(
                f"timed out after {timeout} s waiting for {what}; last seen: {value!r}{tail}"
            )
        await asyncio.sleep(interval)


async def get(url: str, *, host: str | None = None) -> tuple[int, str]:
    headers = {"Host": host} if host else None
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, headers=headers) as response,
    ):
        return response.status, await response.text()


def env_value(body: str, name: str) -> str | None:
    for line in body.splitlines():
        key, sep, value = line.partition("=")
        if sep and key == name:
            return value
    return None


# -- load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    start: float  # time.monotonic()
    end: float
    status: int | None  # None: no HTTP answer at all
    body: str


class Load:
    """Clients that each send one request after another over a keep-alive connection."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.status == 200)

    def start(self, clients: int, path: str, *, count: int | None = None) -> None:
        """``clients`` loops of GET ``path``: ``count`` requests each, or until :meth:`stop`."""
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
            connector=aiohttp.TCPConnector(limit=0),
        )
        loop = asyncio.get_running_loop()
        for i in range(clients):
            self._tasks.append(loop.create_task(self._client(path, count), name=f"client {i}"))

    async def _client(self, path: str, count: int | None) -> None:
        assert self._session is not None
        sent = 0
        while not self._stop.is_set() and (count is None or sent < count):
            sent += 1
            began = time.monotonic()
            try:
                async with self._session.get(self.url + path) as response:
                    body = await response.text()
                    status: int | None = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body = None, f"{type(exc).__name__}: {exc}"
            self.outcomes.append(Outcome(began, time.monotonic(), status, body))

    async def wait(self) -> list[Outcome]:
        """Wait for the clients to finish (count-bounded load)."""
        try:
            await asyncio.gather(*self._tasks)
        finally:
            await self.close()
        return self.outcomes

    async def stop(self) -> list[Outcome]:
        """Let each client finish its request in flight, then end."""
        self._stop.set()
        return await self.wait()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def until_ok(self, more: int, *, timeout: float = DEADLINE) -> None:
        """Wait until ``more`` requests more than now have succeeded."""
        target = self.ok + more
        failed = [o for o in self.outcomes if o.status != 200]
        await poll(
            lambda: _value(self.ok),
            lambda ok: ok >= target,
            f"{target} successful requests (failed so far: {describe(failed)})",
            timeout=timeout,
            interval=0.05,
        )


async def _value(value: _T) -> _T:
    return value


@contextlib.asynccontextmanager
async def load(url: str) -> AsyncIterator[Load]:
    generator = Load(url)
    try:
        yield generator
    finally:
        await generator.close()


def describe(outcomes: list[Outcome]) -> str:
    return "; ".join(f"{o.status} {o.body.strip()[:120]!r}" for o in outcomes[:10])


async def metric_samples(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = await get(url)
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def sigterm_and_wait(child: Daemon, timeout: float = 30.0) -> int:
    child.process.send_signal(signal.SIGTERM)
    try:
        return await child.wait(timeout)
    except TimeoutError:
        pytest.fail(f"{child.name} did not exit within {timeout} s of SIGTERM:\n{child.output()}")


class ProductBug(AssertionError):
    """The product broke one of the issue's promises (kept apart from harness failures, whose
    messages are about the harness)."""


# -- 1. scale to zero, cold starts, pause and resume ---------------------------------------


async def test_scale_to_zero_cold_start_pause_and_resume(world: World) -> None:
    """min_size 0: the first request is served by a container started for it; idle past the
    scale-down delay, zero containers; the next request cold-starts again. Pause stops every
    instance (state paused) and a request still cold-starts one; resume of a min_size 1
    version brings one ready instance with no request; SIGTERM exits 0 and leaves none."""
    name = world.name("zero")
    service = world.service_file(name, world.images.httpd, min_size=0, max_size=2)
    async with world.up([service]) as up:
        socket = up.extra["socket"]
        assert await world.containers(name) == []
        assert (await status_json(socket, name))["state"] == "idle"

        status, body = await get(up.url("/cgi-bin/env"))
        assert status == 200, body
        assert env_value(body, "TIDEGATE_SERVICE") == name
        first = env_value(body, "TIDEGATE_INSTANCE")
        assert await world.instance_ids(name) == {first}
        report = await status_json(socket, name)
        assert (report["state"], report["ready"], report["desired"]) == ("running", 1, 1), report
        assert [i["id"] for i in report["instances"]] == [first]
        samples = await metric_samples(up.metrics_url())
        ready = frozenset({("service", name), ("state", "ready")})
        assert samples[("tidegate_instances", ready)] == 1
        assert samples[("tidegate_desired_instances", frozenset({("service", name)}))] == 1

        # idle past scale_down_delay: drained and stopped, down to zero containers
        await poll(lambda: world.containers(name), lambda cs: cs == [], "zero containers", log=up)
        report = await status_json(socket, name)
        assert (report["state"], report["desired"], report["instances"]) == ("idle", 0, []), report

        status, body = await get(up.url("/cgi-bin/env"))
        assert status == 200, body
        second = env_value(body, "TIDEGATE_INSTANCE")
        assert second != first
        assert await world.instance_ids(name) == {second}

        # pause: every instance stops at once (well before the scale-down delay)
        paused = await tidegate("pause", name, "--socket", str(socket))
        assert paused.returncode == 0, paused.stderr
        await poll(lambda: world.containers(name), lambda cs: cs == [], "paused: zero", log=up)
        report = await status_json(socket, name)
        assert (report["state"], report["instances"]) == ("paused", []), report

        # paused, the next request still succeeds: it cold-starts an instance
        status, body = await get(up.url("/cgi-bin/env"))
        assert status == 200, body
        third = env_value(body, "TIDEGATE_INSTANCE")
        assert third not in (first, second)
        assert await world.instance_ids(name) == {third}

        # pause again, apply a min_size 1 version: paused, it stays at zero ...
        paused = await tidegate("pause", name, "--socket", str(socket))
        assert paused.returncode == 0, paused.stderr
        await poll(lambda: world.containers(name), lambda cs: cs == [], "paused: zero", log=up)
        world.service_file(name, world.images.httpd, min_size=1, max_size=2)
        applied = await tidegate("apply", str(service), "--socket", str(socket))
        assert applied.returncode == 0, applied.stderr
        assert f"{name}: updated" in applied.stdout
        report = await status_json(socket, name)
        assert (report["state"], report["min_size"], report["desired"]) == ("paused", 1, 0)
        assert await world.containers(name) == []

        # ... until resumed: one ready instance, without any request
        resumed = await tidegate("resume", name, "--socket", str(socket))
        assert resumed.returncode == 0, resumed.stderr
        report = await poll(
            lambda: status_json(socket, name),
            lambda s: (s["state"], s["ready"]) == ("running", 1),
            "one ready instance after resume",
            log=up,
        )
        (instance,) = report["instances"]
        assert await world.instance_ids(name) == {instance["id"]}
        # min_size 1 holds past the scale-down delay (observed for the delay and a margin)
        loop = asyncio.get_running_loop()
        until = loop.time() + SCALE_DOWN_DELAY + 1.5
        while loop.time() < until:
            assert await world.instance_ids(name) == {instance["id"]}
            await asyncio.sleep(0.25)

        assert await sigterm_and_wait(up) == 0, up.output()
        assert await world.containers(name) == [], "tidegate up left containers behind"


# -- 2. a burst from zero -------------------------------------------------------------------


@dataclass
class Peaks:
    containers: int = 0  # docker containers of the service
    active: int = 0  # status: instances starting or ready
    ready: int = 0
    inflight: int = 0  # the ingress's count on one instance
    samples: int = 0


async def sample_peaks(world: World, socket: Path, name: str, peaks: Peaks) -> None:
    """Until cancelled: the highest instance counts seen, in docker and in status."""
    while True:
        containers, status = await asyncio.gather(
            world.containers(name), quick_status(socket, name)
        )
        peaks.samples += 1
        peaks.containers = max(peaks.containers, len(containers))
        instances = status["instances"]
        peaks.active = max(
            peaks.active, sum(1 for i in instances if i["state"] in ("starting", "ready"))
        )
        peaks.ready = max(peaks.ready, status["ready"])
        peaks.inflight = max([peaks.inflight, *(i["inflight"] for i in instances)])
        await asyncio.sleep(0.05)


async def test_burst_from_zero_scales_out_within_the_limits(
    world: World, counter_image: str
) -> None:
    """0 -> 10 concurrent clients (5 x max_concurrency 2), 6 requests of 200 ms each, max_size
    4: every request 200; instances rise to max_size and never above (docker and status,
    sampled throughout); and no instance ever has more than max_concurrency requests inside
    it, as the app itself counts them."""
    name = world.name("burst")
    service = world.service_file(name, counter_image, min_size=0, max_size=4, max_concurrency=2)
    clients, each = 10, 6
    async with world.up([service]) as up:
        socket = up.extra["socket"]
        peaks = Peaks()
        sampler = asyncio.get_running_loop().create_task(sample_peaks(world, socket, name, peaks))
        try:
            async with load(up.url()) as burst:
                burst.start(clients, "/cgi-bin/count?ms=200", count=each)
                outcomes = await asyncio.wait_for(burst.wait(), 60)
            # one more sample after the burst, so a peak at its very end is not missed
            taken = peaks.samples
            await poll(lambda: _value(peaks.samples), lambda n: n > taken, "one more sample")
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)

        failed = [o for o in outcomes if o.status != 200]
        assert not failed, f"{len(failed)} failed: {describe(failed)}\n{up.output()[-4000:]}"
        assert len(outcomes) == clients * each
        seen = [_CONCURRENT.search(o.body) for o in outcomes]
        assert all(seen), describe([o for o, m in zip(outcomes, seen, strict=True) if not m])
        inside = [int(m.group(1)) for m in seen if m]
        served_by = {m.group(3) for m in seen if m}
        assert max(inside) <= 2, f"an instance had {max(inside)} requests inside at once"
        assert max(inside) == 2, "the instances were never used at their max_concurrency"
        assert 2 <= len(served_by) <= 4, served_by

        assert peaks.containers <= 4, peaks
        assert peaks.active <= 4, peaks
        assert peaks.inflight <= 2, peaks
        assert peaks.ready == 4, f"expected to scale out to max_size 4: {peaks}"

        samples = await metric_samples(up.metrics_url())
        answered = {
            dict(labels)["code_class"]: value
            for (metric, labels), value in samples.items()
            if metric == "tidegate_requests_total" and ("service", name) in labels
        }
        assert answered.pop("2xx") == clients * each
        assert not any(answered.values()), answered


# -- 3. docker kill under load ------------------------------------------------------------


@dataclass
class KillRun:
    outcomes: list[Outcome]
    killed_at: float  # time.monotonic() just before the kill was sent
    replaced_at: float  # when status first showed the replacement ready
    victim: str
    inflight_on_victim: int  # the ingress's count in the last status before the kill
    log: str


async def kill_an_instance_under_load(world: World) -> KillRun:
    """Two instances at max_concurrency 2 under a steady load of 4 clients (200 ms requests);
    `docker kill` one; wait for its replacement to be ready, in status and in docker, and for
    8 more requests to succeed."""
    name = world.name("kill")
    service = world.service_file(
        name, world.images.httpd, min_size=2, max_size=2, max_concurrency=2
    )
    async with world.up([service]) as up:
        socket = up.extra["socket"]
        report = await poll(
            lambda: quick_status(socket, name),
            lambda s: s["ready"] == 2 and s["state"] == "running",
            "two ready instances",
            log=up,
        )
        before = {i["id"] for i in report["instances"]}
        async with load(up.url()) as steady:
            steady.start(4, "/cgi-bin/slow?ms=200")
            await steady.until_ok(8)
            victim = (await world.containers(name))[0]
            victim_id = victim.labels["tidegate.instance"]
            assert victim_id in before
            report = await quick_status(socket, name)
            inflight = next(i["inflight"] for i in report["instances"] if i["id"] == victim_id)
            killed_at = time.monotonic()
            await asyncio.to_thread(victim.kill)  # SIGKILL, as `docker kill`

            def replaced(s: dict[str, Any]) -> bool:
                ids = {i["id"] for i in s["instances"]}
                return s["ready"] == 2 and len(ids) == 2 and victim_id not in ids

            report = await poll(
                lambda: quick_status(socket, name), replaced, "a replacement", interval=0.02, log=up
            )
            replaced_at = time.monotonic()
            ids = {i["id"] for i in report["instances"]}
            assert all(i["state"] == "ready" for i in report["instances"]), report
            await poll(
                lambda: world.instance_ids(name), lambda found: found == ids, "docker == status"
            )
            await steady.until_ok(8)
            outcomes = await steady.stop()
        assert await world.instance_ids(name) == ids
        assert victim_id in up.output()  # the log says what happened to it
        return KillRun(outcomes, killed_at, replaced_at, victim_id, inflight, up.output())


async def test_killed_instance_is_replaced(world: World) -> None:
    """`docker kill` of an instance under load: a new instance replaces it (status and docker
    agree, the killed one is gone), and once it is ready every request succeeds."""
    run = await kill_an_instance_under_load(world)
    assert run.outcomes and run.inflight_on_victim <= 2
    late = [o for o in run.outcomes if o.start > run.replaced_at and o.status != 200]
    assert not late, f"requests sent after the replacement was ready failed: {describe(late)}"


async def test_only_requests_in_flight_on_a_killed_instance_fail(world: World) -> None:
    """`docker kill` of an instance under load: at most the requests in flight on it (at most
    its max_concurrency, 2) fail, and none sent after the kill."""
    run = await kill_an_instance_under_load(world)
    failed = [o for o in run.outcomes if o.status != 200]
    timeline = [
        (round(o.start - run.killed_at, 3), round(o.end - run.killed_at, 3), o.status)
        for o in failed
    ]
    if len(failed) > 2:
        raise ProductBug(f"{len(failed)} failed (start, end after the kill; status): {timeline}")
    late = [o for o in failed if o.start > run.killed_at]
    if late:
        raise ProductBug(f"requests sent after the kill failed: {describe(late)}")


# -- 4. the standalone scaler restarted under load -----------------------------------------


async def test_scaler_restart_under_load_adopts_without_failures(world: World) -> None:
    """`tidegate ingress` and `tidegate scaler` apart, 2 instances under a steady load; SIGTERM
    the scaler (exit 0, instances keep serving), start it again with the same arguments: no
    request fails, and the containers afterwards are exactly those before (no duplicate, no
    orphan), all ready in the new scaler's status."""
    name = world.name("restart")
    service = world.service_file(
        name, world.images.httpd, min_size=2, max_size=2, max_concurrency=2
    )
    ingress_socket = world.sockets / "ingress.sock"
    scaler_socket = world.sockets / "scaler.sock"
    port, ingress_metrics, scaler_metrics = free_port(), free_port(), free_port()
    ingress_argv = [
        "ingress",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{ingress_metrics}",
        "--control-socket",
        str(ingress_socket),
    ]
    scaler_argv = [
        "scaler",
        str(service),
        "--ingress-socket",
        str(ingress_socket),
        "--socket",
        str(scaler_socket),
        "--metrics-listen",
        f"127.0.0.1:{scaler_metrics}",
        "--state-dir",
        str(world.sockets / "state"),
    ]

    def scaler(n: int) -> contextlib.AbstractAsyncContextManager[Daemon]:
        log = world.files / f"scaler-{n}.log"
        return daemon(
            f"tidegate scaler #{n}",
            scaler_argv,
            log,
            scope=world.scope,
            metrics_port=scaler_metrics,
        )

    ingress_log = world.files / "ingress.log"
    async with daemon(
        "tidegate ingress",
        ingress_argv,
        ingress_log,
        scope=None,  # no runtime in the ingress: nothing to scope
        metrics_port=ingress_metrics,
        port=port,
    ) as ingress:
        async with scaler(1) as first:
            report = await poll(
                lambda: status_json(scaler_socket, name),
                lambda s: (s["state"], s["ready"]) == ("running", 2),
                "two ready instances",
                log=first,
            )
            before = {i["id"] for i in report["instances"]}
            assert await world.instance_ids(name) == before
            async with load(ingress.url()) as steady:
                steady.start(4, "/cgi-bin/slow?ms=100")
                await steady.until_ok(8)

                assert await sigterm_and_wait(first) == 0, first.output()
                # the scaler is gone; the ingress serves on with what it knew
                assert await world.instance_ids(name) == before
                await steady.until_ok(8)

                async with scaler(2) as second:
                    report = await poll(
                        lambda: status_json(scaler_socket, name),
                        lambda s: (s["state"], s["ready"]) == ("running", 2),
                        "two ready instances after the restart",
                        log=second,
                    )
                    await steady.until_ok(8)
                    outcomes = await steady.stop()
                    after = await world.instance_ids(name)
                    report = await status_json(scaler_socket, name)
                    assert "adopted" in second.output(), second.output()

        failed = [o for o in outcomes if o.status != 200]
        assert not failed, f"{len(failed)} of {len(outcomes)} failed: {describe(failed)}"
        assert after == before, f"containers before {before}, after {after}"
        assert {i["id"] for i in report["instances"]} == before, report
        assert all(i["state"] == "ready" for i in report["instances"]), report
        assert report["desired"] == 2, report


# -- 5. errors ------------------------------------------------------------------------------


async def test_errors_are_reported_and_the_other_service_keeps_serving(world: World) -> None:
    """One `tidegate up` with a good service and three broken ones: an image that does not
    exist, an app that exits at once (code 3), an app that never listens. Each broken one
    shows state failing with a last_error that says why (and the log says it too); a bad file
    given to apply exits 1 naming the file and the key and changes nothing; the good service
    answers 200 throughout."""
    good = world.name("good")
    missing = world.name("noimage")
    crash = world.name("crash")
    deaf = world.name("deaf")
    no_such_image = f"{REPOSITORY}/does-not-exist:{secrets.token_hex(4)}"
    files = [
        world.service_file(
            deaf,
            world.images.never_listens,
            min_size=1,
            domains=("deaf.test",),
            health_check={
                "protocol": "tcp",
                "interval": "1s",
                "timeout": "500ms",
                "start_timeout": f"{START_TIMEOUT:g}s",
            },
        ),
        world.service_file(good, world.images.httpd, min_size=1, domains=("good.test",)),
        world.service_file(missing, no_such_image, min_size=1, domains=("noimage.test",)),
        world.service_file(crash, world.images.crash, min_size=1, domains=("crash.test",)),
    ]
    async with world.up(files) as up:
        socket = up.extra["socket"]
        began = time.monotonic()

        async def serves() -> None:
            status, body = await get(up.url("/"), host="good.test")
            assert status == 200, body

        await serves()
        good_before = await poll(
            lambda: status_json(socket, good),
            lambda s: (s["state"], s["ready"]) == ("running", 1),
            "the good service running",
            log=up,
        )

        report = await poll(
            lambda: status_json(socket, missing),
            lambda s: s["state"] == "failing" and no_such_image in (s["last_error"] or ""),
            "the missing image's service failing, naming the image",
            log=up,
        )
        assert report["start_failures"] >= 1 and report["ready"] == 0, report
        assert no_such_image in up.output()

        report = await poll(
            lambda: status_json(socket, crash),
            lambda s: s["state"] == "failing" and s["start_failures"] >= 1,
            "the crashing service failing",
            log=up,
        )
        assert f"exit code {CRASH_EXIT}" in (report["last_error"] or ""), report
        assert report["ready"] == 0 and report["retry_in"] >= 0, report
        assert f"exit code {CRASH_EXIT}" in up.output()
        table = await tidegate("status", "--socket", str(socket))
        assert table.returncode == 0, table.stderr
        assert re.search(rf"^{crash}\s+failing\s", table.stdout, re.M), table.stdout
        await serves()

        # a bad file: apply exits 1 naming the file and the key path; nothing changes, not
        # even the valid file given with it
        bigger = world.service_file(
            good, world.images.httpd, min_size=1, max_size=3, file="ok.yaml"
        )
        bad = world.service_file(
            good,
            world.images.httpd,
            file="bad.yaml",
            autoscaling={"min_size": 2, "max_size": 1},
        )
        applied = await tidegate("apply", str(bigger), str(bad), "--socket", str(socket))
        assert applied.returncode == 1, (applied.stdout, applied.stderr)
        assert f"{bad}: autoscaling.max_size" in applied.stderr, applied.stderr
        unknown = world.files / "typo.yaml"
        unknown.write_text(f"name: {good}\nimage: {world.images.httpd}\nhealth_chek: {{}}\n")
        applied = await tidegate("apply", str(unknown), "--socket", str(socket))
        assert applied.returncode == 1, (applied.stdout, applied.stderr)
        assert str(unknown) in applied.stderr and "health_chek" in applied.stderr, applied.stderr
        good_after = await status_json(socket, good)
        for key in ("state", "revision", "max_size", "desired", "ready", "instances"):
            if key == "instances":
                assert [i["id"] for i in good_after[key]] == [i["id"] for i in good_before[key]]
            else:
                assert good_after[key] == good_before[key], (key, good_before, good_after)
        await serves()

        # never listens: failing once its start timeout has passed
        report = await poll(
            lambda: status_json(socket, deaf),
            lambda s: "not healthy in time" in (s["last_error"] or ""),
            "the never-listening service's start to time out",
            timeout=START_TIMEOUT + 30 - (time.monotonic() - began),
            interval=1.0,
            log=up,
        )
        assert report["state"] == "failing" and report["start_failures"] >= 1, report
        assert "not healthy in time" in up.output()
        await serves()
        assert (await status_json(socket, good))["state"] == "running"

        assert await sigterm_and_wait(up) == 0, up.output()
        for service in (good, missing, crash, deaf):
            assert await world.containers(service) == [], service


async def test_tcp_health_check_does_not_pass_an_app_that_never_listens(world: World) -> None:
    """A never-listening app with the default tcp health check must never become ready."""
    name = world.name("tcp")
    service = world.service_file(
        name,
        world.images.never_listens,
        min_size=1,
        health_check={"protocol": "tcp", "interval": "1s", "timeout": "500ms"},
    )
    async with world.up([service]) as up:
        socket = up.extra["socket"]
        await poll(lambda: world.containers(name), lambda cs: len(cs) == 1, "its container", log=up)
        loop = asyncio.get_running_loop()
        until = loop.time() + 3.0  # the fast probes run every 15 ms: 3 s is 200 of them
        while loop.time() < until:
            report = await quick_status(socket, name)
            if report["ready"]:
                raise ProductBug(f"a never-listening instance became ready: {report}")
            await asyncio.sleep(0.05)
