"""Per-service logs (scaler/logs.py), their collection, and `tidegate logs`.

First the pure parts (times, records, line splitting), then the writer and the readers on
files (rotation, since, follow across a rotation), the command line, then the scaler writing
them: an in-process Scaler over test backends (system records, instance output, usage
records), a restarted scaler going on with an adopted process's output, the scripted story
on the process runtime (`tidegate up`: cold start, a burst that scales out, scale-in to
zero, told back in order by `tidegate logs --system`) and one Docker container's stdout and
stderr reaching app.log. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import stat
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ingress.control import ControlClient
from scaler.daemon import Scaler, load_paths
from scaler.logs import (
    APP_LOG,
    SYSTEM_LOG,
    Follower,
    LineSplitter,
    LogsNotFound,
    ServiceLogs,
    app_record,
    decode_record,
    encode_record,
    format_record,
    format_time,
    parse_since,
    parse_time,
    read_records,
    system_record,
)
from scaler.messages import ApplyFile
from scaler.runtime import Runtime
from tests.backends import running_backends
from tests.conftest import running_ingress, wait_for
from tests.procs import REPO, TIDEGATE, IngressProcess, free_port, run_cli, stop, wait_ready
from tests.test_controller import WAIT, BackendRuntime

T0 = 1_795_694_400.0  # 2026-11-26T12:00:00Z

# -- pure: times, records, lines ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "text"),
    [
        pytest.param(T0, "2026-11-26T12:00:00.000Z", id="whole-second"),
        pytest.param(T0 + 0.1234, "2026-11-26T12:00:00.123Z", id="milliseconds"),
        pytest.param(T0 + 59.9996, "2026-11-26T12:01:00.000Z", id="rounds-up-into-the-minute"),
        pytest.param(0.0, "1970-01-01T00:00:00.000Z", id="epoch"),
    ],
)
def test_format_time(epoch: float, text: str) -> None:
    """Times are RFC 3339 in UTC with exactly three fraction digits and a Z."""
    assert format_time(epoch) == text


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        pytest.param("2026-11-26T12:00:00.123Z", T0 + 0.123, id="z"),
        pytest.param("2026-11-26T14:00:00+02:00", T0, id="offset"),
        pytest.param("2026-11-26T12:00:00Z", T0, id="no-fraction"),
        pytest.param("2026-11-26T12:00:00.123456789Z", T0 + 0.123456, id="nanoseconds"),
    ],
)
def test_parse_time(text: str, epoch: float) -> None:
    """RFC 3339 times with Z or an offset, with or without a fraction, read back."""
    assert parse_time(text) == pytest.approx(epoch, abs=1e-6)


def test_parse_time_needs_a_zone() -> None:
    """A time without a zone is ambiguous: refused."""
    with pytest.raises(ValueError, match="zone"):
        parse_time("2026-11-26T12:00:00")


@pytest.mark.parametrize(
    ("text", "epoch"),
    [
        pytest.param("10m", T0 - 600, id="minutes"),
        pytest.param("90s", T0 - 90, id="seconds"),
        pytest.param("2h", T0 - 7200, id="hours"),
        pytest.param("7d", T0 - 7 * 86400, id="days"),
        pytest.param("2026-11-26T11:00:00Z", T0 - 3600, id="a-time"),
    ],
)
def test_parse_since(text: str, epoch: float) -> None:
    """--since: a duration back from now, or a time."""
    assert parse_since(text, T0) == pytest.approx(epoch)


def test_parse_since_refuses_anything_else() -> None:
    """Neither a duration nor a time: ValueError naming both forms."""
    with pytest.raises(ValueError, match=r"duration or a time.*10m"):
        parse_since("yesterday", T0)


def test_records_are_one_json_line_with_keys_in_order() -> None:
    """A system record starts time, service, event, message; floats keep milliseconds; an
    app record is time, service, instance, stream, message; both round-trip."""
    record = system_record(
        T0 + 0.5, "hello", "scale", "scale up 1 -> 2", {"stable_avg": 2.123456, "ready": 1}
    )
    line = encode_record(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert list(json.loads(line)) == [
        "time",
        "service",
        "event",
        "message",
        "stable_avg",
        "ready",
    ]
    assert json.loads(line)["stable_avg"] == 2.123
    assert decode_record(line) == record
    app = app_record(T0, "hello", "hello-3f9a2c", "stderr", 'a "quoted" line \u00e9')
    assert list(json.loads(encode_record(app))) == [
        "time",
        "service",
        "instance",
        "stream",
        "message",
    ]
    assert decode_record(encode_record(app)) == app


def test_an_unknown_event_is_refused() -> None:
    """System events come from one list (the format others read)."""
    with pytest.raises(ValueError, match="unknown system event"):
        system_record(T0, "hello", "exploded", "boom", {})


@pytest.mark.parametrize(
    "line",
    [
        pytest.param(b'{"time": "2026-11-26T08:00:00.0', id="torn"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"message": "no time"}', id="no-time"),
    ],
)
def test_lines_that_are_not_records_are_none(line: bytes) -> None:
    """What a reader skips: anything but an object with a time."""
    assert decode_record(line) is None


def test_format_record_for_people() -> None:
    """System: TIME  EVENT  message; app: TIME  INSTANCE  STREAM  message."""
    system = system_record(T0, "hello", "ready", "hello-3f9a2c is ready (0.312s after start)", {})
    assert format_record(system) == (
        "2026-11-26T12:00:00.000Z  ready         hello-3f9a2c is ready (0.312s after start)"
    )
    app = app_record(T0, "hello", "hello-3f9a2c", "stdout", "the line")
    assert format_record(app) == "2026-11-26T12:00:00.000Z  hello-3f9a2c  stdout  the line"


def test_line_splitter_fed_a_byte_at_a_time() -> None:
    """Lines come out whole however the bytes arrive; CRLF loses its CR; bad UTF-8 is
    replaced; the end of a stream without a newline comes out on flush."""
    data = "one\r\ntwo \u00e9\n\nthree".encode() + b"\xff"
    splitter = LineSplitter()
    lines = []
    for i in range(len(data)):
        lines += splitter.feed(data[i : i + 1])
    assert lines == ["one", "two \u00e9", ""]
    assert splitter.pending == len(b"three\xff")
    assert splitter.flush() == ["three\ufffd"]
    assert splitter.flush() == []


def test_line_splitter_cuts_long_lines_and_counts_bytes() -> None:
    """A line over max_line comes out in pieces (without waiting for its newline), and
    split() says where each line ends in the stream."""
    splitter = LineSplitter(max_line=4)
    assert splitter.split(b"abcdefghij") == [("abcd", 4), ("efgh", 8)]
    assert splitter.split(b"\nxy\n") == [("ij", 11), ("xy", 14)]
    assert splitter.used == 14 and splitter.pending == 0


# -- the writer and the readers ----------------------------------------------------------------


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "logs"


@contextlib.contextmanager
def writer(log_dir: Path, **kw: Any) -> Iterator[ServiceLogs]:
    logs = ServiceLogs(log_dir, **kw)
    try:
        yield logs
    finally:
        logs.close()


def messages(log_dir: Path, service: str = "hello", *, system: bool = True, **kw: Any) -> list[str]:
    return [r["message"] for r in read_records(log_dir, service, system=system, **kw)]


def test_records_reach_their_files_with_their_modes(log_dir: Path) -> None:
    """System and app records go to <service>/system.log and app.log, files 0640 in
    directories 0750, readable back in order."""
    with writer(log_dir) as logs:
        logs.system("hello", "starting", "starting hello-1", instance="hello-1")
        logs.app("hello", "hello-1", "stdout", "first")
        logs.app("hello", "hello-1", "stderr", "second")
        logs.system("other", "ready", "other-1 is ready")
    assert messages(log_dir) == ["starting hello-1"]
    assert messages(log_dir, system=False) == ["first", "second"]
    assert messages(log_dir, "other") == ["other-1 is ready"]
    app = list(read_records(log_dir, "hello", system=False))
    assert [(r["instance"], r["stream"]) for r in app] == [
        ("hello-1", "stdout"),
        ("hello-1", "stderr"),
    ]
    assert stat.S_IMODE(os.stat(log_dir).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(log_dir / "hello").st_mode) == 0o750
    for name in (SYSTEM_LOG, APP_LOG):
        assert stat.S_IMODE(os.stat(log_dir / "hello" / name).st_mode) == 0o640


def test_records_are_written_without_close_or_flush(log_dir: Path) -> None:
    """The writer thread writes a record soon after it arrives (within FLUSH_INTERVAL), with
    nobody calling flush()."""
    with writer(log_dir) as logs:
        logs.system("hello", "paused", "paused")
        path = log_dir / "hello" / SYSTEM_LOG
        deadline = time.monotonic() + 5.0
        while not (path.exists() and path.read_bytes().endswith(b"\n")):
            assert time.monotonic() < deadline, "the record was not written"
            time.sleep(0.01)


def test_rotation_keeps_three_and_readers_read_oldest_first(log_dir: Path) -> None:
    """Past max_bytes a file becomes .1 (.1 becomes .2, .2 .3, the old .3 is dropped), and
    read_records gives what is left in the order it was written."""
    with writer(log_dir, max_bytes=300) as logs:
        for i in range(40):
            logs.system("hello", "scale", f"decision {i:02d}")
            logs.flush()  # one write per record, so rotation happens at record boundaries
    directory = log_dir / "hello"
    names = {p.name for p in directory.iterdir() if p.name.startswith(SYSTEM_LOG)}
    rotated = {f"{SYSTEM_LOG}.1", f"{SYSTEM_LOG}.2", f"{SYSTEM_LOG}.3"}
    # the current file is missing only right after a rotation, before the next record
    assert names in (rotated, rotated | {SYSTEM_LOG}), names
    kept = messages(log_dir)
    numbers = [int(m.split()[1]) for m in kept]
    assert numbers == list(range(numbers[0], 40)), "in order, with no gap"
    assert numbers[0] > 0, "the oldest ones rotated away"
    for path in directory.iterdir():
        assert path.stat().st_size < 300 + 200


def test_since_selects_by_time(log_dir: Path) -> None:
    """read_records(since=...) gives the records at or after it."""
    now = [T0]
    with writer(log_dir, clock=lambda: now[0]) as logs:
        for i in range(5):
            logs.system("hello", "scale", f"at {i}")
            now[0] += 60
    assert messages(log_dir, since=T0 + 120) == ["at 2", "at 3", "at 4"]
    assert messages(log_dir, since=T0 + 1000) == []


def test_unknown_service_and_bad_names(log_dir: Path) -> None:
    """No directory: LogsNotFound; a name that is not a service name (a path): ValueError."""
    with writer(log_dir):
        pass
    with pytest.raises(LogsNotFound, match="nope"):
        list(read_records(log_dir, "nope", system=True))
    with pytest.raises(ValueError, match="not a service name"):
        list(read_records(log_dir, "../etc", system=True))


def test_records_after_close_are_still_written(log_dir: Path) -> None:
    """A late record (a controller finishing after the scaler closed its logs) is written at
    once, not lost."""
    logs = ServiceLogs(log_dir)
    logs.close()
    logs.system("hello", "stopped", "stopped hello-1")
    assert messages(log_dir) == ["stopped hello-1"]


def test_cursors_survive_a_restart_and_are_forgotten(log_dir: Path) -> None:
    """The time of each instance's last line is saved on close and read by the next writer;
    forget() drops it."""
    with writer(log_dir) as logs:
        logs.app("hello", "hello-1", "stdout", "a", T0)
        logs.app("hello", "hello-1", "stdout", "b", T0 + 2)
        logs.app("hello", "hello-2", "stdout", "c", T0 + 1)
        logs.app("hello", "hello-2", "stdout", "late but older", T0 - 5)
    with writer(log_dir) as logs:
        assert logs.cursor("hello", "hello-1") == T0 + 2
        assert logs.cursor("hello", "hello-2") == T0 + 1
        assert logs.cursor("hello", "hello-3") is None
        logs.forget("hello", "hello-1")
    with writer(log_dir) as logs:
        assert logs.cursor("hello", "hello-1") is None
        assert logs.cursor("hello", "hello-2") == T0 + 1


def test_follower_gets_new_records_across_a_rotation(log_dir: Path) -> None:
    """A Follower's first poll gives what is there; later polls what was written since, a
    half-written line only once whole, and after a rotation the rest of the old file and
    then the new one."""
    path = log_dir / "hello" / SYSTEM_LOG
    path.parent.mkdir(parents=True)

    def line(text: str) -> bytes:
        return encode_record(system_record(T0, "hello", "scale", text, {}))

    path.write_bytes(line("old"))
    with Follower(log_dir, "hello", system=True) as follower:
        assert [r["message"] for r in follower.poll()] == ["old"]
        assert follower.poll() == []
        whole, torn = line("one"), line("two")
        with path.open("ab") as f:
            f.write(whole + torn[:10])
        assert [r["message"] for r in follower.poll()] == ["one"]
        with path.open("ab") as f:
            f.write(torn[10:] + line("last before rotation"))
        os.replace(path, path.with_name(SYSTEM_LOG + ".1"))  # as the writer rotates
        assert [r["message"] for r in follower.poll()] == ["two", "last before rotation"]
        path.write_bytes(line("first after rotation"))
        assert [r["message"] for r in follower.poll()] == ["first after rotation"]
        with path.open("ab") as f:
            f.write(line("more"))
        assert [r["message"] for r in follower.poll()] == ["more"]


def test_follower_waits_for_a_file_not_written_yet(log_dir: Path) -> None:
    """The service's directory without app.log (no output yet): nothing, then its lines."""
    (log_dir / "hello").mkdir(parents=True)
    with Follower(log_dir, "hello", system=False, since=T0) as follower:
        assert follower.poll() == []
        with writer(log_dir) as logs:
            logs.app("hello", "hello-1", "stdout", "too old", T0 - 1)
            logs.app("hello", "hello-1", "stdout", "hi", T0 + 1)
        assert [r["message"] for r in follower.poll()] == ["hi"]


# -- `tidegate logs` ---------------------------------------------------------------------------


def cli(log_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("logs", *args, "--log-dir", str(log_dir))


def test_logs_command_prints_app_and_system_records(log_dir: Path) -> None:
    """`tidegate logs` prints app records, --system the events, --json the stored lines,
    --since only recent ones; an unknown service exits 1 saying so, a bad --since 2."""
    now = time.time()
    clock = [now - 3600]
    with writer(log_dir, clock=lambda: clock[0]) as logs:
        logs.app("hello", "hello-3f9a2c", "stdout", "an hour ago")
        logs.system("hello", "starting", "starting hello-3f9a2c", instance="hello-3f9a2c")
        clock[0] = now
        logs.app("hello", "hello-3f9a2c", "stderr", "just now")
    result = cli(log_dir, "hello")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{format_time(now - 3600)}  hello-3f9a2c  stdout  an hour ago",
        f"{format_time(now)}  hello-3f9a2c  stderr  just now",
    ]
    recent = cli(log_dir, "hello", "--since", "10m")
    assert [line.split("  ")[-1] for line in recent.stdout.splitlines()] == ["just now"]
    system = cli(log_dir, "hello", "--system", "--json")
    assert [json.loads(line)["event"] for line in system.stdout.splitlines()] == ["starting"]
    unknown = cli(log_dir, "nope")
    assert unknown.returncode == 1
    assert "no logs for service 'nope'" in unknown.stderr
    bad = cli(log_dir, "hello", "--since", "last tuesday")
    assert bad.returncode == 2 and "--since" in bad.stderr


async def test_logs_follow_prints_new_records_and_exits_0_on_ctrl_c(log_dir: Path) -> None:
    """--follow prints what is there, then what is written later, and exits 0 on SIGINT
    without a traceback."""
    logs = ServiceLogs(log_dir)
    try:
        logs.app("hello", "hello-1", "stdout", "before")
        logs.flush()
        process = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "logs",
            "hello",
            "--follow",
            "--log-dir",
            str(log_dir),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert process.stdout is not None and process.stderr is not None
            async with asyncio.timeout(20.0):
                assert (await process.stdout.readline()).decode().endswith("  before\n")
                logs.app("hello", "hello-1", "stdout", "after")
                assert (await process.stdout.readline()).decode().endswith("  after\n")
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(10.0):
                assert await process.wait() == 0
            assert "Traceback" not in (await process.stderr.read()).decode()
        finally:
            await stop(process)
    finally:
        logs.close()


# -- the scaler writing them: in process, over test backends -----------------------------------

# An app that prints a line at start on stdout and stderr and one per request; GET /hold
# waits until the file $RELEASE exists.
STORY_APP = """\
import os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTANCE = os.environ["TIDEGATE_INSTANCE"]
RELEASE = os.environ["RELEASE"]


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/hold":
            print(f"holding a request on {INSTANCE}", flush=True)
            deadline = time.monotonic() + 30
            while not os.path.exists(RELEASE) and time.monotonic() < deadline:
                time.sleep(0.02)
        print(f"served {self.path} on {INSTANCE}", flush=True)
        body = INSTANCE.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


print(f"{INSTANCE} listening", flush=True)
print(f"{INSTANCE} says hello on stderr", file=sys.stderr, flush=True)
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), App).serve_forever()
"""


def pids_with_env(entry: bytes) -> list[int]:
    """Processes whose environment holds ``entry`` (NAME=value), among those we may read."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                if entry in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                    found.append(int(name))
    return found


def service_text(name: str = "svc", min_size: int = 1) -> str:
    return textwrap.dedent(
        f"""\
        name: {name}
        image: fake:1
        instance: {{cpu: 0.25, memory: 512MB}}
        autoscaling: {{min_size: {min_size}, max_size: 2, max_concurrency: 4}}
        health_check: {{interval: 2s, timeout: 1s}}
        queue: {{timeout: 10s}}
        request_timeout: 10s
        """
    )


def records(log_dir: Path, service: str = "svc", *, system: bool = True) -> list[dict[str, Any]]:
    try:
        return list(read_records(log_dir, service, system=system))
    except LogsNotFound:
        return []


async def test_the_scaler_records_events_output_and_usage(tmp_path: Path) -> None:
    """A Scaler with a log directory writes the service's lifecycle (applied, starting,
    started, ready, draining, stopped), each instance's output to app.log, a usage record
    every interval whose increments add up to the controller's instance-seconds, and a last
    one when the service is deleted."""
    log_dir = tmp_path / "logs"
    socket_path = tmp_path / "control.sock"
    async with (
        running_backends(1) as backends,
        running_ingress([], control_socket=str(socket_path)) as ingress,
        aiohttp.ClientSession() as session,
    ):
        runtime = BackendRuntime([b.address for b in backends])

        def factory(kind: str, state_dir: Path) -> Runtime:
            return runtime

        control = ControlClient(socket_path)
        scaler = Scaler(
            control,
            state_dir=tmp_path / "state",
            runtime_factory=factory,
            log_dir=log_dir,
            usage_interval=0.2,
        )
        try:
            await scaler.start([])
            assert ingress.control is not None
            subscribers = ingress.control._subscribers
            await wait_for(lambda: bool(subscribers), WAIT, "the subscription")
            file = tmp_path / "svc.yaml"
            file.write_text(service_text())
            await scaler.apply([ApplyFile(path=str(file), text=file.read_text())])
            controller = scaler.controllers["svc"]
            await wait_for(lambda: controller.status().ready == 1, WAIT, "the instance")
            (instance,) = [i.id for i in controller.status().instances]
            runtime.write(instance, "hello from the app")
            runtime.write(instance, "and a warning", "stderr")
            host, port = ingress.http_addresses[0]
            async with session.get(f"http://{host}:{port}/echo") as response:
                assert response.status == 200

            def usage_so_far() -> list[dict[str, Any]]:
                return [r for r in records(log_dir) if r["event"] == "usage"]

            await wait_for(
                lambda: any(r["idle_seconds"] > 0 for r in usage_so_far()),
                WAIT,
                "a usage record",
            )
            await wait_for(
                lambda: len(records(log_dir, system=False)) == 2, WAIT, "the app's two lines"
            )
            await scaler.delete("svc")
            scaler.events.flush()  # type: ignore[union-attr]
        finally:
            await scaler.close(stop_instances=True)
            await control.close()

    app = records(log_dir, system=False)
    assert [(r["instance"], r["stream"], r["message"]) for r in app] == [
        (instance, "stdout", "hello from the app"),
        (instance, "stderr", "and a warning"),
    ]
    system = records(log_dir)
    lifecycle = [r["event"] for r in system if r["event"] != "usage"]
    assert lifecycle == [
        "applied",
        "starting",
        "started",
        "ready",
        "draining",
        "drained",
        "stopped",
        "applied",
    ], lifecycle
    created, deleted = (r for r in system if r["event"] == "applied")
    assert (created["action"], created["min_size"], created["file"]) == ("created", 1, str(file))
    assert deleted["action"] == "deleted"
    ready = next(r for r in system if r["event"] == "ready")
    assert ready["instance"] == instance and ready["took_seconds"] >= 0
    usage = [r for r in system if r["event"] == "usage"]
    assert usage[0]["active_seconds"] == usage[0]["idle_seconds"] == 0  # accounting starts
    assert all((r["cpu"], r["memory_bytes"]) == (0.25, 512_000_000) for r in usage)
    assert system[-2]["event"] == "usage", "the last usage record comes with the deletion"
    total_active = sum(r["active_seconds"] for r in usage)
    total_idle = sum(r["idle_seconds"] for r in usage)
    assert total_idle == pytest.approx(controller.usage.idle_seconds, abs=0.01)
    assert total_active == pytest.approx(controller.usage.active_seconds, abs=0.01)


async def test_a_restarted_scaler_goes_on_with_an_adopted_instances_output(
    tmp_path: Path,
) -> None:
    """A scaler that leaves (SIGTERM: instances keep running) and its successor, on the
    process runtime: what the instance wrote while no scaler ran reaches app.log, and no line
    is there twice."""
    run = secrets.token_hex(6)
    services = tmp_path / "services"
    services.mkdir()
    (services / "app.py").write_text(STORY_APP)
    file = services / "hello.yaml"
    file.write_text(
        textwrap.dedent(
            f"""\
            name: hello
            runtime: process
            command: [python3, app.py]
            env: {{RELEASE: "{tmp_path / "release"}", LOGTEST_RUN: "{run}"}}
            autoscaling: {{min_size: 1, max_size: 1}}
            """
        )
    )
    log_dir = tmp_path / "logs"
    socket_path = tmp_path / "control.sock"

    def app_lines() -> list[str]:
        return [r["message"] for r in records(log_dir, "hello", system=False)]

    @contextlib.asynccontextmanager
    async def scaler_running(stop_instances: bool) -> AsyncIterator[Scaler]:
        control = ControlClient(socket_path)
        scaler = Scaler(control, state_dir=tmp_path / "state", log_dir=log_dir)
        try:
            loaded, errors = load_paths([file])
            await scaler.start(loaded, errors)
            yield scaler
        finally:
            await scaler.close(stop_instances=stop_instances)
            await control.close()

    try:
        async with (
            running_ingress([], control_socket=str(socket_path)),
            aiohttp.ClientSession() as session,
        ):
            async with scaler_running(stop_instances=False) as first:
                controller = first.controllers["hello"]
                await wait_for(lambda: controller.status().ready == 1, WAIT, "the instance")
                (instance,) = controller.status().instances
                await wait_for(
                    lambda: f"{instance.id} listening" in app_lines(), WAIT, "its first line"
                )
            async with session.get(f"http://{instance.address}/while-alone") as response:
                assert response.status == 200  # no scaler runs: the app's line waits in its file
            async with scaler_running(stop_instances=True) as second:
                adopted = second.controllers["hello"]
                await wait_for(lambda: adopted.status().ready == 1, WAIT, "the adopted one")
                assert [i.id for i in adopted.status().instances] == [instance.id]
                await wait_for(
                    lambda: f"served /while-alone on {instance.id}" in app_lines(),
                    WAIT,
                    "the line written while no scaler ran",
                )
    finally:
        for pid in pids_with_env(f"LOGTEST_RUN={run}".encode()):  # only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    lines = app_lines()
    assert lines[:2] == [f"{instance.id} listening", f"{instance.id} says hello on stderr"]
    # each once: nothing read twice across the restart (other lines, such as the tracebacks
    # http.server prints when a health probe resets its connection, may repeat themselves)
    for line in (*lines[:2], f"served /while-alone on {instance.id}"):
        assert lines.count(line) == 1, lines
    events = [r["event"] for r in records(log_dir, "hello")]
    assert "adopted" in events and events.count("starting") == 1


# -- the scripted story: `tidegate up` on the process runtime ------------------------------------

STORY_DEADLINE = 20.0  # seconds for each step of the story (a start, a scale decision)


async def poll(what: str, check: Callable[[], bool], child: IngressProcess) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORY_DEADLINE
    while not check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{child.output()[-4000:]}")
        await asyncio.sleep(0.05)


def in_order(lines: list[str], expected: list[Callable[[str], bool]]) -> list[str]:
    """The lines matching ``expected``'s predicates one after another (a subsequence);
    fails naming the first predicate with no match after the previous one's."""
    found: list[str] = []
    rest = iter(lines)
    for i, predicate in enumerate(expected):
        for line in rest:
            if predicate(line):
                found.append(line)
                break
        else:
            pytest.fail(f"step {i} of the story not found after {found[-1:]}:\n" + "\n".join(lines))
    return found


def event(name: str, *words: str) -> Callable[[str], bool]:
    """A human `--system` line of this event whose message holds ``words``."""

    def match(line: str) -> bool:
        parts = line.split(None, 2)
        return len(parts) == 3 and parts[1] == name and all(w in parts[2] for w in words)

    return match


@pytest.mark.slow
async def test_the_story_of_a_burst_told_by_tidegate_logs(tmp_path: Path) -> None:
    """Cold start, a burst that scales out, scale-in to zero: `tidegate logs --system` tells
    it in order with the numbers behind each decision, and `tidegate logs` has the app's own
    lines with their instances.

    max_concurrency 2 and three held requests: demand 3 over one instance is a stable
    scale-up (the 60 s average, young, passes 2) but not a panic (3 < 2 x 2), so zero comes
    after scale_down_delay without requests instead of after the 60 s panic window."""
    run = secrets.token_hex(6)
    services = tmp_path / "services"
    services.mkdir()
    (services / "app.py").write_text(STORY_APP)
    release = tmp_path / "release"
    spec = services / "story.yaml"
    spec.write_text(
        textwrap.dedent(
            f"""\
            name: story
            runtime: process
            command: [python3, app.py]
            env: {{RELEASE: "{release}", LOGTEST_RUN: "{run}"}}
            autoscaling: {{min_size: 0, max_size: 3, max_concurrency: 2, scale_down_delay: 2s}}
            health_check: {{protocol: tcp}}
            """
        )
    )
    log_dir = tmp_path / "logs"
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "up",
            str(spec),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-dir",
            str(log_dir),
            "--scaler-socket",
            str(tmp_path / "s.sock"),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    child = IngressProcess(process, port, metrics_port, log)

    def events(name: str) -> list[dict[str, Any]]:
        return [r for r in records(log_dir, "story") if r["event"] == name]

    try:
        await wait_ready(child)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def get(path: str) -> int:
                async with session.get(child.url(path)) as response:
                    await response.read()
                    return response.status

            assert await get("/") == 200  # the cold start
            burst = [asyncio.create_task(get("/hold")) for _ in range(3)]
            try:

                def held() -> list[dict[str, Any]]:
                    return [
                        r
                        for r in records(log_dir, "story", system=False)
                        if r["message"].startswith("holding a request")
                    ]

                # the third request waits for a second instance, which then takes it
                await poll("the burst held by two instances", lambda: len(held()) == 3, child)
                assert len({r["instance"] for r in held()}) == 2
            finally:
                release.touch()
                statuses = await asyncio.gather(*burst, return_exceptions=True)
            assert statuses == [200, 200, 200]
        await poll("both instances stopped", lambda: len(events("stopped")) == 2, child)
        process.send_signal(signal.SIGTERM)
        assert await child.wait(20.0) == 0, child.output()
    finally:
        await stop(process)
        for pid in pids_with_env(f"LOGTEST_RUN={run}".encode()):  # only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    told = run_cli("logs", "story", "--system", "--log-dir", str(log_dir))
    assert told.returncode == 0, told.stderr
    lines = told.stdout.splitlines()
    in_order(
        lines,
        [
            event("applied", "loaded from"),
            event("scale", "scale up 0 -> 1", "cold start"),
            event("starting"),
            event("started"),
            event("ready", "after start"),
            event("scale", "scale up 1 -> 2", "60s avg", "/ 2 -> 2"),
            event("starting"),
            event("started"),
            event("ready"),
            event("scale", "scale down 2 -> 0", "idle: no demand for", "delay 2s"),
            event("draining", "scale down to 0"),
            event("draining", "scale down to 0"),
            event("stopped"),
            event("stopped"),
            event("usage", "instance-seconds"),
        ],
    )
    scales = [r for r in records(log_dir, "story") if r["event"] == "scale"]
    assert [(r["desired_from"], r["desired_to"]) for r in scales] == [(0, 1), (1, 2), (2, 0)]
    scale_out = scales[1]
    assert (scale_out["ready"], scale_out["max_concurrency"]) == (1, 2)
    assert scale_out["stable_avg"] > 2.0 and scale_out["current_demand"] == 3
    assert scale_out["panic_avg"] < 4.0, "no panic: zero must not wait for the panic window"
    assert scales[2]["current_demand"] == 0 and "idle" in scales[2]["reason"]
    usage = [r for r in records(log_dir, "story") if r["event"] == "usage"]
    assert sum(r["active_seconds"] for r in usage) > 0

    output = run_cli("logs", "story", "--log-dir", str(log_dir))
    assert output.returncode == 0, output.stderr
    instances = {r["instance"] for r in events("ready")}
    assert len(instances) == 2
    for instance in instances:
        assert f"  {instance}  output  {instance} listening" in output.stdout
        assert f"  {instance}  output  {instance} says hello on stderr" in output.stdout
    served = [line for line in output.stdout.splitlines() if "served /hold on" in line]
    assert len(served) == 3
    assert {line.split("  ")[1] for line in served} == instances


# -- Docker: a container's stdout and stderr in app.log ----------------------------------------


@pytest.fixture(scope="module")
def docker_images() -> Any:
    """The busybox test images (tests/images.py), built or found; no clean-up of containers
    other than this module's own (other test runs may be using theirs)."""
    from tests.images import _docker_client, build_images

    client = _docker_client()
    try:
        yield build_images(client)
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.slow
async def test_a_containers_stdout_and_stderr_reach_app_log(
    tmp_path: Path, docker_images: Any
) -> None:
    """Through the Scaler and the Docker runtime, a container's stdout and stderr lines land
    in the service's app.log with their stream and instance."""
    import docker

    from scaler.runtimes.docker import DockerRuntime
    from tests.images import TEST_SCOPE

    scope = {**TEST_SCOPE, "tidegate.test.run": secrets.token_hex(6)}
    name = f"tgtest-logs-{secrets.token_hex(3)}"
    command = [
        "/bin/busybox",
        "sh",
        "-c",
        'echo "to stdout"; echo "to stderr" >&2; trap "exit 0" TERM; '
        '/bin/busybox httpd -f -p "$PORT" -h /www & wait $!',
    ]
    file = tmp_path / f"{name}.yaml"
    file.write_text(
        textwrap.dedent(
            f"""\
            name: {name}
            image: {docker_images.httpd}
            command: {json.dumps(command)}
            instance: {{cpu: 0.25, memory: 64MB}}
            autoscaling: {{min_size: 1, max_size: 1}}
            """
        )
    )
    log_dir = tmp_path / "logs"
    socket_path = tmp_path / "control.sock"

    def factory(kind: str, state_dir: Path) -> Runtime:
        return DockerRuntime(scope_labels=scope)

    client = docker.from_env()
    try:
        async with running_ingress([], control_socket=str(socket_path)):
            control = ControlClient(socket_path)
            scaler = Scaler(
                control, state_dir=tmp_path / "state", runtime_factory=factory, log_dir=log_dir
            )
            try:
                await scaler.start([])
                await scaler.apply([ApplyFile(path=str(file), text=file.read_text())])

                def lines() -> set[tuple[str, str]]:
                    assert scaler.events is not None
                    scaler.events.flush()
                    return {
                        (r["stream"], r["message"]) for r in records(log_dir, name, system=False)
                    }

                await wait_for(
                    lambda: {("stdout", "to stdout"), ("stderr", "to stderr")} <= lines(),
                    30.0,
                    "both lines in app.log",
                )
                (instance,) = {r["instance"] for r in records(log_dir, name, system=False)}
                assert instance.startswith(f"{name}-")
            finally:
                await scaler.close(stop_instances=True)
                await control.close()
    finally:
        for container in client.containers.list(
            all=True, filters={"label": f"tidegate.test.run={scope['tidegate.test.run']}"}
        ):
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True, v=True)
        client.close()
    assert [r["message"] for r in records(log_dir, name, system=False)].count("to stdout") == 1
