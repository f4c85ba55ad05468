"""The scaler's control API (scaler.api) over a real unix socket, against a fake scaler."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from ingress.control import ControlError
from ingress.unixsock import ControlSocketError
from scaler.api import ScalerApiServer, ScalerClient
from scaler.messages import (
    ApplyFile,
    ApplyRequest,
    ApplyResponse,
    ApplyResult,
    FileError,
    InstanceStatus,
    ServiceStatus,
    StatusReport,
)
from scaler.spec import SpecError


def service_status(name: str, **fields: object) -> ServiceStatus:
    """A status with every field set to something other than a default or zero."""
    values: dict[str, object] = {
        "name": name,
        "state": "running",
        "runtime": "process",
        "revision": "0123456789ab",
        "domains": [f"{name}.example.com"],
        "min_size": 1,
        "max_size": 4,
        "max_concurrency": 8,
        "desired": 2,
        "ready": 1,
        "starting": 1,
        "draining": 1,
        "inflight": 3,
        "queued": 2,
        "requests_per_second": 12.5,
        "p99_seconds": 0.0995,
        "reason": "panic: 6 s average wants 2",
        "start_failures": 1,
        "backoff_seconds": 1.0,
        "retry_in": 0.25,
        "last_error": f"{name}-aa exited at once (exit code 3)",
        "last_cold_start_seconds": 0.42,
        "scale_events": {"up": 3, "down": 1},
        "active_instance_seconds": 7.5,
        "idle_instance_seconds": 2.25,
        "instances": [
            InstanceStatus(
                id=f"{name}-aa",
                state="ready",
                address="127.0.0.1:40001",
                inflight=3,
                current=True,
                age_seconds=9.5,
            ),
            InstanceStatus(
                id=f"{name}-bb",
                state="starting",
                address=None,
                inflight=0,
                current=False,
                age_seconds=0.5,
            ),
        ],
    }
    values.update(fields)
    return ServiceStatus(**values)  # type: ignore[arg-type]


class FakeScaler:
    """A ScalerTarget in memory: services by name; a file whose text contains "bad" is a
    SpecError; every call is recorded."""

    def __init__(self) -> None:
        self.services = {
            "hello": service_status("hello"),
            "web": service_status("web", p99_seconds=None, last_error=None, instances=[]),
        }
        self.errors = [FileError("/srv/broken.yaml", "/srv/broken.yaml: name: missing")]
        self.calls: list[tuple[str, object]] = []

    def status(self, service: str | None = None) -> StatusReport:
        self.calls.append(("status", service))
        if service is not None:
            return StatusReport(services=[self.services[service]], errors=self.errors)
        return StatusReport(services=list(self.services.values()), errors=self.errors)

    async def apply(self, files: list[ApplyFile]) -> ApplyResponse:
        self.calls.append(("apply", files))
        for file in files:
            if "bad" in file.text:
                raise SpecError(file.path, "autoscaling.max_size", "must be between 1 and 25")
        results = [
            ApplyResult(service=Path(f.path).stem, action="created", revision="feedfacecafe")
            for f in files
        ]
        return ApplyResponse(results=results)

    def pause(self, service: str) -> ServiceStatus:
        self.calls.append(("pause", service))
        status = msgspec.structs.replace(self.services[service], state="paused", ready=0)
        self.services[service] = status
        return status

    def resume(self, service: str) -> ServiceStatus:
        self.calls.append(("resume", service))
        status = msgspec.structs.replace(self.services[service], state="running")
        self.services[service] = status
        return status

    async def delete(self, service: str) -> None:
        self.calls.append(("delete", service))
        del self.services[service]


@pytest.fixture
def target() -> FakeScaler:
    return FakeScaler()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "scaler.sock"


@pytest.fixture
async def server(target: FakeScaler, sock_path: Path) -> AsyncIterator[ScalerApiServer]:
    srv = ScalerApiServer(target, sock_path)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture
async def client(server: ScalerApiServer) -> AsyncIterator[ScalerClient]:
    cli = ScalerClient(server.path)
    try:
        yield cli
    finally:
        await cli.close()


async def raw(
    path: str | Path, method: str, url: str, body: bytes = b""
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP request on the socket with the body exactly as given."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
        session.request(method, "http://tidegate-scaler" + url, data=body) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def error_of(body: bytes) -> str:
    return msgspec.json.decode(body, type=dict[str, str])["error"]


# -- endpoints -----------------------------------------------------------------------------------


async def test_status_round_trips_every_field(client: ScalerClient, target: FakeScaler) -> None:
    report = await client.status()
    assert report == StatusReport(
        services=[target.services["hello"], target.services["web"]], errors=target.errors
    )
    assert target.calls == [("status", None)]


async def test_status_of_one_service(client: ScalerClient, target: FakeScaler) -> None:
    report = await client.status("web")
    assert report.services == [target.services["web"]]
    assert report.services[0].p99_seconds is None
    assert target.calls == [("status", "web")]


async def test_apply_round_trips_files_and_results(
    client: ScalerClient, target: FakeScaler
) -> None:
    files = [
        ApplyFile(path="/srv/svc/api.yaml", text="name: api\nenv: {A: 'ü'}\n"),
        ApplyFile(path="/srv/svc/worker.yaml", text="name: worker\n"),
    ]
    response = await client.apply(files)
    assert response == ApplyResponse(
        results=[
            ApplyResult("api", "created", "feedfacecafe"),
            ApplyResult("worker", "created", "feedfacecafe"),
        ]
    )
    assert target.calls == [("apply", files)]


async def test_pause_resume_delete(client: ScalerClient, target: FakeScaler) -> None:
    paused = await client.pause("hello")
    assert paused == target.services["hello"]
    assert (paused.state, paused.ready) == ("paused", 0)
    resumed = await client.resume("hello")
    assert resumed.state == "running"
    await client.delete("hello")
    assert "hello" not in target.services
    assert target.calls == [("pause", "hello"), ("resume", "hello"), ("delete", "hello")]
    assert [s.name for s in (await client.status()).services] == ["web"]


async def test_delete_answers_204_with_no_body(server: ScalerApiServer) -> None:
    status, _, body = await raw(server.path, "DELETE", "/v1/services/web")
    assert (status, body) == (204, b"")


@pytest.mark.parametrize("call", ["status", "pause", "resume", "delete"])
async def test_unknown_service_is_404_naming_it(
    client: ScalerClient, target: FakeScaler, call: str
) -> None:
    name = "no such/svc?x=1"  # quoted in the URL: the server must see the whole name
    with pytest.raises(ControlError) as caught:
        await getattr(client, call)(name)
    assert caught.value.status == 404
    assert caught.value.message == f"unknown service {name!r}"
    assert target.calls == [(call, name)]


async def test_bad_file_is_400_with_the_spec_error(
    client: ScalerClient, target: FakeScaler
) -> None:
    files = [
        ApplyFile(path="/srv/ok.yaml", text="name: ok\n"),
        ApplyFile(path="/srv/b.yaml", text="name: b  # bad\n"),
    ]
    with pytest.raises(ControlError) as caught:
        await client.apply(files)
    assert caught.value.status == 400
    assert caught.value.message == "/srv/b.yaml: autoscaling.max_size: must be between 1 and 25"


async def test_empty_file_list_is_400(client: ScalerClient, target: FakeScaler) -> None:
    with pytest.raises(ControlError) as caught:
        await client.apply([])
    assert caught.value.status == 400
    assert "at least one service file" in caught.value.message
    assert target.calls == []


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b'{"files": [', "truncated", id="truncated"),
        pytest.param(b"{files: []}", "malformed", id="malformed"),
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b"{}", "missing required field `files`", id="missing"),
        pytest.param(b'{"files": [], "force": true}', "unknown field `force`", id="unknown"),
        pytest.param(
            b'{"files": [{"path": "/a.yaml", "text": "", "mode": 1}]}',
            "`$.files[0]`",
            id="unknown-nested",
        ),
        pytest.param(b'{"files": [{"path": "/a.yaml"}]}', "`text`", id="missing-nested"),
        pytest.param(b'{"files": "/a.yaml"}', "`$.files`", id="wrong-type"),
    ],
)
async def test_bad_apply_body_is_400(
    server: ScalerApiServer, target: FakeScaler, body: bytes, fragment: str
) -> None:
    status, headers, answer = await raw(server.path, "POST", "/v1/apply", body)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert fragment in error_of(answer)
    assert target.calls == []


async def test_a_valid_raw_body_is_accepted(server: ScalerApiServer, target: FakeScaler) -> None:
    """The counterpart of the bad bodies: the same endpoint takes a well-formed one."""
    body = msgspec.json.encode(ApplyRequest(files=[ApplyFile(path="/a.yaml", text="name: a")]))
    status, _, answer = await raw(server.path, "POST", "/v1/apply", body)
    assert status == 200
    assert msgspec.json.decode(answer, type=ApplyResponse).results[0].service == "a"


@pytest.mark.parametrize(
    ("method", "url", "allowed"),
    [
        ("POST", "/v1/status", "GET"),
        ("GET", "/v1/apply", "POST"),
        ("GET", "/v1/services/hello/pause", "POST"),
        ("PUT", "/v1/services/hello/resume", "POST"),
        ("GET", "/v1/services/hello", "DELETE"),
    ],
)
async def test_wrong_method_is_405_json(
    server: ScalerApiServer, target: FakeScaler, method: str, url: str, allowed: str
) -> None:
    status, headers, body = await raw(server.path, method, url)
    assert status == 405
    assert headers["Content-Type"].startswith("application/json")
    assert "Method Not Allowed" in error_of(body)
    assert allowed in headers["Allow"]
    assert target.calls == []


async def test_unknown_path_is_404_json(server: ScalerApiServer) -> None:
    status, _, body = await raw(server.path, "GET", "/v1/nothing")
    assert status == 404
    assert error_of(body)


async def test_a_crash_in_the_target_is_500_json(
    client: ScalerClient, target: FakeScaler, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(service: str | None = None) -> StatusReport:
        raise RuntimeError("scaler bug")

    monkeypatch.setattr(target, "status", broken)
    with pytest.raises(ControlError) as caught:
        await client.status()
    assert caught.value.status == 500
    assert "RuntimeError: scaler bug" in caught.value.message


# -- the socket ----------------------------------------------------------------------------------


async def test_socket_is_private_and_removed_on_close(target: FakeScaler, sock_path: Path) -> None:
    srv = ScalerApiServer(target, sock_path)
    await srv.start()
    try:
        assert srv.path == str(sock_path)
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    finally:
        await srv.close()
    assert not sock_path.exists()
    await srv.close()  # twice is harmless


async def test_second_server_on_a_live_socket_is_refused(
    server: ScalerApiServer, client: ScalerClient, sock_path: Path
) -> None:
    second = ScalerApiServer(FakeScaler(), sock_path)
    with pytest.raises(ControlSocketError, match="another process is listening"):
        await second.start()
    await second.close()
    # the first one still has its socket and answers on it
    assert sock_path.exists()
    assert [s.name for s in (await client.status()).services] == ["hello", "web"]


async def test_stale_socket_is_replaced(target: FakeScaler, sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(sock_path))  # bound, never listening, then closed: as after a crash
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    srv = ScalerApiServer(target, sock_path)
    await srv.start()
    cli = ScalerClient(sock_path)
    try:
        assert len((await cli.status()).services) == 2
    finally:
        await cli.close()
        await srv.close()
    assert not sock_path.exists()


async def test_client_without_a_server_gets_status_0(tmp_path: Path) -> None:
    cli = ScalerClient(tmp_path / "missing.sock")
    try:
        with pytest.raises(ControlError) as caught:
            await cli.status()
        assert caught.value.status == 0
        assert "missing.sock" in caught.value.message
    finally:
        await cli.close()
