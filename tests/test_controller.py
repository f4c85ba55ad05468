"""Tests of the per-service actuator: a FakeRuntime whose instances are real test backends,
an in-process ingress reached over its control socket, and the real health checker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    remove_orphans,
)
from scaler.health import HealthChecker
from scaler.runtime import InstanceInfo, LaunchSpec
from scaler.runtimes.fake import FakeHost, FakeRuntime
from scaler.spec import AutoscalingSpec, HealthCheckSpec, ServiceSpec
from tests.backends import running_backends
from tests.conftest import running_ingress, url, wait_for

WAIT = 10.0  # seconds for a condition that takes milliseconds when things work


class BackendRuntime(FakeRuntime):
    """A FakeRuntime whose instances answer at real backends' addresses, taken in turn."""

    def __init__(self, addresses: list[str], host: FakeHost | None = None) -> None:
        super().__init__(host)
        self.addresses = addresses
        self.attempts = 0  # start() calls, failed ones included

    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        self.attempts += 1
        info = await super().start(spec)
        address = self.addresses[(len(self.launched) - 1) % len(self.addresses)]
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
        instances = {i.id: i.state for i in self.controller.status().instances}
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
    crash: bool = False,
) -> AsyncIterator[Harness]:
    """The controller for `spec` wired to an ingress and the event streams; all stopped on exit.
    With `crash`, the runtime is closed first, so the instances outlive the controller as
    containers outlive a scaler that died."""
    tmp_path.mkdir(parents=True, exist_ok=True)
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
            if crash:
                await runtime.close()
            await controller.stop(drain=not crash)
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
            assert h.controller.status().last_cold_start_seconds is not None
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
            assert h.controller.status().scale_events == {"up": 1, "down": 0}


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
                assert controller.status().desired == 1
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
            assert first not in {i.id for i in h.controller.status().instances}
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert h.controller.status().start_failures == 0


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
                return lambda: controller.status().start_failures == n

            await wait_for(failures(1), WAIT, "the first failure")
            assert controller.status().backoff_seconds == 1.0
            assert "no such image" in str(controller.status().last_error)
            now[0] += 0.5
            controller.reconcile()
            assert runtime.attempts == 1  # still backing off
            assert controller.status().retry_in == 0.5
            now[0] += 0.5
            controller.reconcile()
            await wait_for(failures(2), WAIT, "the second failure")
            assert controller.status().backoff_seconds == 2.0
            now[0] += 2.0
            controller.reconcile()
            await wait_for(failures(3), WAIT, "the third failure")
            assert controller.status().backoff_seconds == 4.0
            now[0] += 3.9
            controller.reconcile()
            assert runtime.attempts == 3
            now[0] += 0.1
            controller.reconcile()
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "a ready instance")
            assert runtime.attempts == 4
            assert controller.status().start_failures == 0
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


async def test_a_restarted_controller_adopts_the_running_instance(tmp_path: Path) -> None:
    """A second controller over the same host takes over the running instance: no new start,
    and it serves."""
    async with (
        running_backends(1) as backends,
        aiohttp.ClientSession() as session,
    ):
        host = FakeHost()
        addresses = [backends[0].address]
        spec = service(min_size=1)
        first = BackendRuntime(addresses, host)
        async with harness(tmp_path / "first", spec, first, stats=False, crash=True) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            (instance,) = h.ids("ready")
        assert list(host.instances) == [instance]
        second = BackendRuntime(addresses, host)
        async with harness(tmp_path / "second", spec, second, stats=False) as h:
            await wait_for(lambda: h.ids("ready") == [instance], WAIT, "the adopted instance")
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert second.launched == []
            assert backends[0].requests == 1
        assert host.instances == {}


async def test_an_old_revision_is_replaced_without_a_failed_request(tmp_path: Path) -> None:
    """An adopted instance of another revision serves until one of the current revision is
    ready, then is drained (its request in flight completes) and stopped."""
    now = [1000.0]
    async with (
        running_backends(2) as backends,
        aiohttp.ClientSession() as session,
    ):
        host = FakeHost()
        old_spec = service(min_size=1)
        first = BackendRuntime([backends[0].address], host)
        async with harness(tmp_path / "first", old_spec, first, stats=False, crash=True) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the old instance")
            (old,) = h.ids("ready")
        new_spec = msgspec.structs.replace(old_spec, env={"VERSION": "2"})
        assert new_spec.spec_hash() != old_spec.spec_hash()
        second = BackendRuntime([backends[1].address], host)
        second.fail_next_start("the new image is still being pulled")  # holds the new one back
        async with harness(
            tmp_path / "second", new_spec, second, stats=False, clock=lambda: now[0]
        ) as h:
            controller = h.controller
            await wait_for(
                lambda: h.ids("ready") == [old] and controller.status().start_failures == 1,
                WAIT,
                "the old instance ready and the new start backing off",
            )
            await controller.flush()
            slow = asyncio.create_task(get(session, h.ingress, "/slow"))
            try:
                await wait_for(lambda: backends[0].inflight == 1, WAIT, "a request on the old one")
                now[0] += 1.0
                controller.reconcile()
                await wait_for(lambda: h.ids("draining") == [old], WAIT, "the old one draining")
                (new,) = h.ids("ready")
                assert host.instances[new].revision == new_spec.spec_hash()
                assert old not in second.stopped  # its request is still in flight
                await controller.flush()
                status, body = await get(session, h.ingress, "/echo")
                assert status == 200, body
                assert backends[1].requests == 1
            finally:
                backends[0].release.set()
                slow_status, slow_body = await slow
            assert slow_status == 200, slow_body
            await wait_for(lambda: old in second.stopped, WAIT, "the old one stopped")
            assert list(host.instances) == [new]
            assert backends[0].requests == 1


async def test_an_orphan_of_a_removed_service_is_stopped(tmp_path: Path) -> None:
    """Instances of a service that has no file any more are stopped; the others are kept."""
    async with running_backends(1) as backends:
        host = FakeHost()
        first = BackendRuntime([backends[0].address], host)
        async with harness(tmp_path, service(min_size=1), first, stats=False, crash=True) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the instance")
            (orphan,) = h.ids("ready")
        runtime = FakeRuntime(host)
        kept = await runtime.start(LaunchSpec(service="other", revision="r", instance_id="o-1"))
        removed = await remove_orphans(runtime, {"other"}, logging.getLogger("test"))
        assert removed == [orphan]
        assert runtime.stopped == [orphan]
        assert list(host.instances) == [kept.instance_id]


async def test_an_exited_leftover_is_removed(tmp_path: Path) -> None:
    """An instance that exited while no controller ran is removed, and a new one started."""
    async with (
        running_backends(1) as backends,
        aiohttp.ClientSession() as session,
    ):
        host = FakeHost()
        addresses = [backends[0].address]
        spec = service(min_size=1)
        first = BackendRuntime(addresses, host)
        async with harness(tmp_path / "first", spec, first, stats=False, crash=True) as h:
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "the first instance")
            (dead,) = h.ids("ready")
        FakeRuntime(host).crash(dead, exit_code=137)
        second = BackendRuntime(addresses, host)
        async with harness(tmp_path / "second", spec, second, stats=False) as h:
            assert second.stopped == [dead]
            await wait_for(lambda: len(h.ids("ready")) == 1, WAIT, "a new instance")
            assert dead not in h.ids("ready")
            assert len(second.launched) == 1
            status, body = await get(session, h.ingress, "/echo")
            assert status == 200, body
            assert h.controller.status().start_failures == 0
