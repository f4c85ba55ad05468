"""Tests of the per-service actuator: a FakeRuntime whose instances are real test backends,
an in-process ingress reached over its control socket, and the real health checker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from ingress.control import ControlClient
from ingress.messages import ServiceStats
from ingress.server import Ingress
from scaler.controller import (
    ServiceController,
    backoff_delay,
    dispatch_control_events,
    dispatch_runtime_events,
)
from scaler.health import HealthChecker
from scaler.runtime import InstanceInfo, LaunchSpec
from scaler.runtimes.fake import FakeRuntime
from scaler.spec import AutoscalingSpec, HealthCheckSpec, ServiceSpec
from tests.backends import running_backends
from tests.conftest import running_ingress, url, wait_for

WAIT = 10.0  # seconds for a condition that takes milliseconds when things work


class BackendRuntime(FakeRuntime):
    """A FakeRuntime whose instances answer at real backends' addresses, taken in turn."""

    def __init__(self, addresses: list[str]) -> None:
        super().__init__()
        self.addresses = addresses
        self.attempts = 0  # start() calls, failed ones included

    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        self.attempts += 1
        info = await super().start(spec)
        address = self.addresses[(self.host.started - 1) % len(self.addresses)]
        info = msgspec.structs.replace(info, address=address)
        self.host.instances[spec.instance_id] = info
        return info


def service(**autoscaling: Any) -> ServiceSpec:
    return ServiceSpec(
        name="svc",
        image="fake:1",
        autoscaling=AutoscalingSpec(**autoscaling),
        health_check=HealthCheckSpec(protocol="tcp", interval=1.0, timeout=0.5),
        queue=msgspec.structs.replace(ServiceSpec(name="x").queue, timeout=WAIT),
    )


@dataclass
class Harness:
    ingress: Ingress
    controller: ServiceController
    runtime: BackendRuntime

    def ids(self, state: str) -> list[str]:
        instances: dict[str, str] = self.controller.status()["instances"]  # type: ignore[assignment]
        return [i for i, s in instances.items() if s == state]

    def stats(self) -> ServiceStats:
        svc = self.ingress.router.service("svc")
        assert svc is not None
        return svc.stats()


@contextlib.asynccontextmanager
async def harness(
    tmp_path: Path,
    spec: ServiceSpec,
    runtime: BackendRuntime,
    *,
    stats: bool = True,
    clock: Callable[[], float] | None = None,
) -> AsyncIterator[Harness]:
    """The controller for `spec` wired to an ingress and the event streams; all stopped on exit."""
    socket_path = tmp_path / "control.sock"
    async with running_ingress([], control_socket=str(socket_path)) as ingress:
        control = ControlClient(socket_path)
        health = HealthChecker()
        extra = {} if clock is None else {"clock": clock}
        controller = ServiceController(spec, runtime, control, health, stop_grace=1.0, **extra)
        controllers = {spec.name: controller}
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(dispatch_control_events(control, controllers, stats=stats)),
            loop.create_task(dispatch_runtime_events(runtime, controllers)),
        ]
        try:
            # the ingress's subscriber set: events sent before we subscribe would be lost
            assert ingress.control is not None
            subscribers = ingress.control._subscribers
            await wait_for(lambda: bool(subscribers), WAIT, "the subscription")
            await controller.start()
            yield Harness(ingress, controller, runtime)
        finally:
            await controller.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await health.close()
            await control.close()
            await runtime.close()


async def get(session: aiohttp.ClientSession, ingress: Ingress, path: str) -> tuple[int, str]:
    async with session.get(url(ingress, path)) as response:
        return response.status, await response.text()


async def test_cold_start_on_the_first_request(tmp_path: Path) -> None:
    """At min_size 0 nothing runs until a request arrives; it is held and then served."""
    async with (
        running_backends(1) as backends,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])
        async with harness(tmp_path, service(min_size=0, max_size=2), runtime) as h:
            assert runtime.launched == []
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert len(runtime.launched) == 1
            assert backends[0].requests == 1
            assert h.controller.status()["last_cold_start_seconds"] is not None
        assert runtime.host.instances == {}


async def test_scale_up_on_demand(tmp_path: Path) -> None:
    """Three slow requests at max_concurrency 1 bring up three instances, one request each."""
    async with (
        running_backends(3) as backends,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])
        spec = service(min_size=1, max_size=3, max_concurrency=1)
        async with harness(tmp_path, spec, runtime) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            requests = [asyncio.create_task(get(session, h.ingress, "/slow")) for _ in range(3)]
            try:
                await wait_for(lambda: len(h.ids("ready")) == 3, WAIT, "three ready instances")
                await wait_for(
                    lambda: all(b.inflight == 1 for b in backends), WAIT, "one request each"
                )
            finally:
                for backend in backends:
                    backend.release.set()
                results = await asyncio.gather(*requests)
            assert [status for status, _ in results] == [200, 200, 200]
            assert all(b.max_inflight == 1 for b in backends)
            assert h.controller.status()["scale_events"] == {"up": 1, "down": 0}


async def test_drain_before_stop(tmp_path: Path) -> None:
    """Scaling down drains the removed instance: its in-flight request completes, and only
    then is it stopped."""
    async with (
        running_backends(2) as backends,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])
        spec = service(min_size=1, max_size=3, max_concurrency=3, scale_down_delay=0.0)
        async with harness(tmp_path, spec, runtime, stats=False) as h:
            controller = h.controller
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            # demand 6 at 3 per instance: two instances
            controller.on_stats(
                ServiceStats("svc", inflight=0, queued=6, arrivals=6, completions=0), 1000.0
            )
            await wait_for(lambda: len(h.ids("ready")) == 2, WAIT, "two ready instances")
            await controller.flush()
            requests = [asyncio.create_task(get(session, h.ingress, "/slow")) for _ in range(2)]
            try:
                await wait_for(lambda: all(b.inflight == 1 for b in backends), WAIT, "both busy")
                controller.on_stats(h.stats(), 1001.0)
                # a steady 2 in flight fits one instance at 3 per instance: scale down
                controller.on_stats(h.stats(), 1100.0)
                assert controller.status()["desired"] == 1
                draining = h.ids("draining")
                assert len(draining) == 1
                await controller.flush()
                states = {i.id: i.state for i in h.stats().instances}
                assert states[draining[0]] == "draining"
                assert runtime.stopped == []
            finally:
                for backend in backends:
                    backend.release.set()
                results = await asyncio.gather(*requests)
            assert [status for status, _ in results] == [200, 200]
            await wait_for(lambda: runtime.stopped == draining, WAIT, "the drained one stopped")
            assert len(h.ids("ready")) == 1


async def test_replacement_after_a_crash(tmp_path: Path) -> None:
    """An instance that exits unasked is replaced at once and its remains removed."""
    async with (
        running_backends(1) as backends,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])
        async with harness(tmp_path, service(min_size=1), runtime, stats=False) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            (first,) = h.ids("ready")
            runtime.crash(first, exit_code=137)
            await wait_for(lambda: h.ids("ready") not in ([], [first]), WAIT, "a ready replacement")
            await wait_for(lambda: first in runtime.stopped, WAIT, "the crashed one removed")
            assert first not in h.controller.status()["instances"]  # type: ignore[operator]
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert h.controller.status()["start_failures"] == 0


async def test_backoff_after_repeated_start_failures(tmp_path: Path) -> None:
    """Failed starts in a row wait 1 s, 2 s, 4 s before the next attempt; success resets."""
    now = [1000.0]
    async with running_backends(1) as backends:
        runtime = BackendRuntime([b.address for b in backends])
        for _ in range(3):
            runtime.fail_next_start("no such image")
        async with harness(
            tmp_path, service(min_size=1), runtime, stats=False, clock=lambda: now[0]
        ) as h:
            controller = h.controller

            def failures(n: int) -> Callable[[], bool]:
                return lambda: controller.status()["start_failures"] == n

            await wait_for(failures(1), WAIT, "the first failure")
            assert controller.status()["backoff_seconds"] == 1.0
            assert "no such image" in str(controller.status()["last_error"])
            now[0] += 0.5
            controller.reconcile()
            assert runtime.attempts == 1  # still backing off
            assert controller.status()["retry_in"] == 0.5
            now[0] += 0.5
            controller.reconcile()
            await wait_for(failures(2), WAIT, "the second failure")
            assert controller.status()["backoff_seconds"] == 2.0
            now[0] += 2.0
            controller.reconcile()
            await wait_for(failures(3), WAIT, "the third failure")
            assert controller.status()["backoff_seconds"] == 4.0
            now[0] += 3.9
            controller.reconcile()
            assert runtime.attempts == 3
            now[0] += 0.1
            controller.reconcile()
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "a ready instance")
            assert runtime.attempts == 4
            assert controller.status()["start_failures"] == 0
    assert [backoff_delay(n) for n in (1, 2, 3, 6, 7, 50)] == [1, 2, 4, 32, 60, 60]


async def test_unhealthy_instance_is_drained_and_replaced(tmp_path: Path) -> None:
    """An instance that stops answering its health check is drained, stopped and replaced."""
    async with (
        running_backends(2) as backends,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])
        spec = msgspec.structs.replace(
            service(min_size=1),
            health_check=HealthCheckSpec(interval=0.05, timeout=0.02, unhealthy_threshold=1),
        )
        async with harness(tmp_path, spec, runtime, stats=False) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            (first,) = h.ids("ready")
            runner = backends[0].runner
            assert runner is not None
            await runner.cleanup()  # the first instance's address stops answering
            backends[0].runner = None
            await wait_for(lambda: h.ids("ready") not in ([], [first]), WAIT, "a ready replacement")
            await wait_for(lambda: first in runtime.stopped, WAIT, "the unhealthy one stopped")
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert backends[1].requests == 1
