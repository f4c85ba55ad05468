"""Tests of the Scaler (scaler/daemon.py): apply, rolling replacement, pause and resume,
delete, loading at start and orphans. Instances are real test backends behind a FakeRuntime;
the ingress runs in-process and is reached over its control socket, as in production."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from ingress.control import ControlClient
from ingress.server import Ingress
from scaler.daemon import Scaler, load_paths
from scaler.messages import ApplyFile, ServiceStatus
from scaler.runtime import InstanceInfo, Runtime
from scaler.runtimes.fake import FakeHost
from scaler.spec import SpecError, parse_service_text
from tests.backends import Backend, running_backends
from tests.conftest import running_ingress, url, wait_for
from tests.test_controller import WAIT, BackendRuntime


def service_text(name: str = "svc", *, extra: str = "", min_size: int = 1) -> str:
    return textwrap.dedent(
        f"""\
        name: {name}
        image: fake:1
        autoscaling: {{min_size: {min_size}, max_size: 3, max_concurrency: 4}}
        health_check: {{interval: 2s, timeout: 1s}}
        queue: {{timeout: 10s}}
        request_timeout: 10s
        """
    ) + textwrap.dedent(extra)


@dataclass
class Rig:
    ingress: Ingress
    scaler: Scaler
    runtime: BackendRuntime
    tmp: Path
    session: aiohttp.ClientSession

    def file(self, text: str, name: str = "svc.yaml") -> ApplyFile:
        path = self.tmp / name
        path.write_text(text)
        return ApplyFile(path=str(path), text=text)

    def status(self, name: str = "svc") -> ServiceStatus:
        return self.scaler.status(name).services[0]

    async def get(self, path: str = "/echo", host: str | None = None) -> int:
        headers = {"Host": host} if host else None
        async with self.session.get(url(self.ingress, path), headers=headers) as response:
            await response.read()
            return response.status


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path, backends: list[Backend], host: FakeHost | None = None, *, start: bool = True
) -> AsyncIterator[Rig]:
    """A Scaler over an in-process ingress; every runtime kind is the same BackendRuntime.
    With ``start`` it is started with no services, subscribed to the ingress's events."""
    socket_path = tmp_path / "control.sock"
    runtime = BackendRuntime([b.address for b in backends], host)

    def factory(kind: str, state_dir: Path) -> Runtime:
        return runtime

    async with (
        running_ingress([], control_socket=str(socket_path)) as ingress,
        aiohttp.ClientSession() as session,
    ):
        control = ControlClient(socket_path)
        scaler = Scaler(control, state_dir=tmp_path / "state", runtime_factory=factory)
        try:
            if start:
                await scaler.start([])
                assert ingress.control is not None
                subscribers = ingress.control._subscribers
                await wait_for(lambda: bool(subscribers), WAIT, "the subscription")
            yield Rig(ingress, scaler, runtime, tmp_path, session)
        finally:
            await scaler.close(stop_instances=True)
            await control.close()


async def test_apply_replaces_a_changed_service_without_dropping_a_request(
    tmp_path: Path,
) -> None:
    """A new env is a new revision: a new instance starts and becomes ready while the old one
    serves, then the old one is drained and stopped; requests all along get 200."""
    async with running_backends(2) as backends, rig(tmp_path, backends) as r:
        result = await r.scaler.apply([r.file(service_text())])
        assert [(x.service, x.action) for x in result.results] == [("svc", "created")]
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        (old,) = [i.id for i in r.status().instances]
        old_revision = r.status().revision

        statuses: list[int] = []
        done = asyncio.Event()

        async def load() -> None:
            while not done.is_set() and len(statuses) < 2000:
                statuses.append(await r.get())

        loader = asyncio.create_task(load())
        try:
            await wait_for(lambda: len(statuses) >= 5, WAIT, "traffic before the apply")
            changed = service_text(extra="env: {COLOUR: blue}\n")
            result = await r.scaler.apply([r.file(changed)])
            assert result.results[0].action == "replaced"
            assert result.results[0].revision != old_revision

            def replaced() -> bool:
                ids = [i.id for i in r.status().instances]
                return len(ids) == 1 and ids[0] != old and r.status().ready == 1

            await wait_for(replaced, WAIT, "the old instance replaced")
            count = len(statuses)
            await wait_for(lambda: len(statuses) >= count + 5, WAIT, "traffic after the apply")
        finally:
            done.set()
            await loader
        assert set(statuses) == {200}
        assert r.runtime.stopped == [old]
        assert r.runtime.launched[-1].env["COLOUR"] == "blue"
        assert r.status().instances[0].current


async def test_apply_in_place_and_unchanged(tmp_path: Path) -> None:
    """Scaling settings apply without touching instances; the same file again is a no-op."""
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        assert (await r.scaler.apply([r.file(service_text())])).results[0].action == "unchanged"
        bigger = service_text().replace("max_size: 3", "max_size: 5")
        assert (await r.scaler.apply([r.file(bigger)])).results[0].action == "updated"
        assert r.status().max_size == 5
        assert len(r.runtime.launched) == 1
        assert r.runtime.stopped == []


async def test_a_new_revision_that_fails_leaves_the_old_one_serving(tmp_path: Path) -> None:
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        for _ in range(3):
            r.runtime.fail_next_start("no such image: fake:2")
        await r.scaler.apply([r.file(service_text().replace("fake:1", "fake:2"))])
        await wait_for(lambda: r.status().state == "failing", WAIT, "the failing state")
        status = r.status()
        assert "fake:2" in (status.last_error or "")
        assert [i.current for i in status.instances] == [False]
        assert await r.get() == 200  # the previous revision still serves


async def test_a_bad_file_in_an_apply_changes_nothing(tmp_path: Path) -> None:
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        good = r.file(service_text("other", extra="domains: [other.test]\n"), "other.yaml")
        bad = r.file(service_text("third").replace("max_size: 3", "max_size: 0"), "third.yaml")
        with pytest.raises(SpecError, match=r"third\.yaml: autoscaling\.max_size"):
            await r.scaler.apply([good, bad])
        assert sorted(r.scaler.controllers) == ["svc"]


async def test_apply_checks_files_against_the_running_services(tmp_path: Path) -> None:
    """svc takes the default route; another file without domains would take it too."""
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        with pytest.raises(SpecError, match=r"other\.yaml: domains: .*default route"):
            await r.scaler.apply([r.file(service_text("other"), "other.yaml")])
        # the same file, giving svc domains and other the default route, is fine together
        both = [
            r.file(service_text(extra="domains: [svc.test]\n")),
            r.file(service_text("other", min_size=0), "other.yaml"),
        ]
        actions = [x.action for x in (await r.scaler.apply(both)).results]
        assert actions == ["updated", "created"]
        assert await r.get(host="svc.test") == 200


async def test_pause_stops_everything_and_a_request_starts_it_again(tmp_path: Path) -> None:
    async with running_backends(2) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        assert await r.get() == 200
        status = r.scaler.pause("svc")
        assert status.state == "paused"
        assert status.desired == 0
        await wait_for(lambda: not r.status().instances, WAIT, "every instance stopped")
        assert len(r.runtime.stopped) == 1
        # a request while paused is a cold start
        assert await r.get() == 200
        assert r.status().ready == 1
        assert r.status().state == "paused"
        status = r.scaler.resume("svc")
        assert status.state != "paused"
        assert status.desired == 1


async def test_resume_brings_back_min_size(tmp_path: Path) -> None:
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        r.scaler.pause("svc")
        await wait_for(lambda: not r.status().instances, WAIT, "every instance stopped")
        r.scaler.resume("svc")
        await wait_for(lambda: r.status().ready == 1, WAIT, "min_size back")
        assert r.status().state == "running"


async def test_delete_drains_stops_and_unroutes(tmp_path: Path) -> None:
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text(extra="domains: [svc.test]\n"))])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        await r.scaler.delete("svc")
        assert r.scaler.controllers == {}
        assert r.runtime.host.instances == {}
        assert r.ingress.router.service("svc") is None
        assert await r.get(host="svc.test") == 404
        with pytest.raises(KeyError):
            await r.scaler.delete("svc")


def orphan(host: FakeHost, service: str) -> str:
    instance_id = f"{service}-0rphan"
    host.instances[instance_id] = InstanceInfo(
        instance_id=instance_id,
        service=service,
        revision="r",
        state="running",
        address="127.0.0.1:9",
    )
    return instance_id


async def test_start_removes_orphans_only_when_every_file_loaded(tmp_path: Path) -> None:
    """A service whose file is gone loses its instances at start, but not while another
    file failed to load: that file may be the service's own, broken by an edit."""
    host = FakeHost()
    gone = orphan(host, "gone")
    async with running_backends(1) as backends:
        (tmp_path / "a").mkdir()
        async with rig(tmp_path / "a", backends, host, start=False) as r:
            errors = [load_paths([r.file("name: [\n", "broken.yaml").path])[1][0]]
            await r.scaler.start([], errors)
            assert gone in host.instances
            report = r.scaler.status()
            assert [e.file for e in report.errors] == [str(r.tmp / "broken.yaml")]
        (tmp_path / "b").mkdir()
        async with rig(tmp_path / "b", backends, host, start=False) as r:
            await r.scaler.start([])
            assert gone not in host.instances


def test_load_paths_reads_directories_and_reports_each_bad_file(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service_text("alpha"))
    (tmp_path / "b.yml").write_text(service_text("beta").replace("max_size: 3", "max_size: 0"))
    (tmp_path / "c.yaml").write_text(service_text("gamma"))  # a second default route
    (tmp_path / "notes.txt").write_text("not a service")
    loaded, errors = load_paths([tmp_path])
    assert [spec.name for spec, _ in loaded] == ["alpha"]
    assert [Path(e.file).name for e in errors] == ["b.yml", "c.yaml"]
    assert "autoscaling.max_size" in errors[0].error
    assert "default route" in errors[1].error
    missing = tmp_path / "missing.yaml"
    assert load_paths([missing])[1][0].error.startswith(f"{missing}: ")


async def test_audit_notices_an_instance_gone_without_an_event(tmp_path: Path) -> None:
    """The runtime's list is compared periodically: an instance that vanished while the event
    stream was broken is replaced as if its exit had been reported."""
    async with running_backends(2) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        (gone,) = [i.id for i in r.status().instances]
        del r.runtime.host.instances[gone]  # no event: as if the stream had missed it
        controller = r.scaler.controllers["svc"]
        found = {i.instance_id: i for i in await r.runtime.list()}
        controller.audit(found, listed_at=0.0)  # a list older than the instance proves nothing
        assert gone in {i.id for i in r.status().instances}
        controller.audit(found, listed_at=float("inf"))
        await wait_for(
            lambda: r.status().ready == 1 and gone not in {i.id for i in r.status().instances},
            WAIT,
            "a replacement",
        )
        assert len(r.runtime.launched) == 2


async def test_a_restarted_scaler_keeps_routing_what_was_serving(tmp_path: Path) -> None:
    """The standalone scaler leaves its instances serving on exit; the next one adopts them
    and the ingress never loses them from its ready list: no request is held or failed, and
    nothing is started twice."""
    host = FakeHost()
    async with running_backends(1) as backends, rig(tmp_path, backends, host) as r:
        await r.scaler.apply([r.file(service_text())])
        await wait_for(lambda: r.status().ready == 1, WAIT, "the first instance")
        (kept,) = [i.id for i in r.status().instances]
        await r.scaler.close(stop_instances=False)
        assert kept in host.instances  # left serving

        svc = r.ingress.router.service("svc")
        assert svc is not None
        assert [i.id for i in svc.stats().instances] == [kept]

        runtime = BackendRuntime([b.address for b in backends], host)
        socket_path = tmp_path / "control.sock"
        control = ControlClient(socket_path)
        successor = Scaler(
            control, state_dir=tmp_path / "state", runtime_factory=lambda k, d: runtime
        )
        try:
            path = r.tmp / "svc.yaml"
            spec = parse_service_text(path.read_text(), str(path))
            await successor.start([(spec, str(path))])
            routed = r.ingress.router.service("svc")
            assert routed is not None
            assert [(i.id, i.state) for i in routed.stats().instances] == [(kept, "ready")]
            assert successor.status("svc").services[0].ready == 1
            assert runtime.launched == []
            assert await r.get() == 200
        finally:
            await successor.close(stop_instances=True)
            await control.close()


async def test_reload_applies_the_paths_and_deletes_only_their_removed_services(
    tmp_path: Path,
) -> None:
    """SIGHUP's reload: services of the paths follow their files; one applied from another
    file is not the paths' to delete; nothing is deleted while a file fails to load."""
    async with running_backends(2) as backends, rig(tmp_path, backends, start=False) as r:
        a = r.file(service_text("alpha", min_size=0, extra="domains: [a.test]\n"), "a.yaml")
        b = r.file(service_text("beta", min_size=0, extra="domains: [b.test]\n"), "b.yaml")
        loaded, errors = load_paths([a.path, b.path])
        await r.scaler.start(loaded, errors)
        other = r.file(service_text("gamma", min_size=0, extra="domains: [c.test]\n"), "c.yaml")
        await r.scaler.apply([other])

        broken = r.file("name: [\n", "a.yaml")
        loaded, errors = load_paths([broken.path])
        await r.scaler.reload(loaded, errors)
        assert sorted(r.scaler.controllers) == ["alpha", "beta", "gamma"]  # nothing deleted
        assert [e.file for e in r.scaler.status().errors] == [broken.path]

        fixed = r.file(
            service_text("alpha", min_size=0, extra="domains: [a.test]\nenv: {X: '2'}\n"),
            "a.yaml",
        )
        loaded, errors = load_paths([fixed.path])
        results = await r.scaler.reload(loaded, errors)
        assert [(x.service, x.action) for x in results] == [("alpha", "replaced")]
        assert sorted(r.scaler.controllers) == ["alpha", "gamma"]  # beta's file is gone
        assert r.scaler.status().errors == []


async def test_scopes_keep_two_scalers_apart(tmp_path: Path) -> None:
    """A scaler adopts and removes as orphans only its own scope's instances."""
    from scaler.daemon import make_runtime

    mine = make_runtime("process", tmp_path, "mine")
    theirs = make_runtime("process", tmp_path, "theirs")
    try:
        assert (tmp_path / "process" / "mine").is_dir()
        assert (tmp_path / "process" / "theirs").is_dir()
    finally:
        await mine.close()
        await theirs.close()
    docker = make_runtime("docker", tmp_path, "mine")
    try:
        assert docker._scope == {"tidegate.scope": "mine"}  # type: ignore[attr-defined]
    finally:
        await docker.close()
    with pytest.raises(ValueError, match="DNS label"):
        Scaler(None, state_dir=tmp_path, scope="Not A Label")  # type: ignore[arg-type]


async def test_status_keeps_the_recent_scale_events_and_cold_starts(tmp_path: Path) -> None:
    async with running_backends(1) as backends, rig(tmp_path, backends) as r:
        await r.scaler.apply([r.file(service_text(min_size=0))])
        assert r.status().recent_cold_starts == []
        assert await r.get() == 200  # a cold start
        status = r.status()
        (cold,) = status.recent_cold_starts
        assert cold.seconds == status.last_cold_start_seconds
        assert [
            (e.direction, e.from_desired, e.to_desired) for e in status.recent_scale_events
        ] == [("up", 0, 1)]
        assert "cold start" in status.recent_scale_events[0].reason
        r.scaler.pause("svc")
        newest = r.status().recent_scale_events[0]
        assert (newest.direction, newest.to_desired, newest.reason) == ("down", 0, "paused")
