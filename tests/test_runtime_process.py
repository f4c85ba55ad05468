"""The process runtime and the fake: the shared Runtime contract for both, then what only local
processes have (process groups, SIGTERM grace, records on disk, inherited environment)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from scaler.runtime import InstanceInfo, LaunchError, LaunchSpec, Runtime
from scaler.runtimes.fake import FakeHost, FakeRuntime
from scaler.runtimes.process import ProcessRuntime
from tests.procs import free_port
from tests.runtime_contract import (
    SERVICE,
    RuntimeContract,
    RuntimeHarness,
    http_get,
    new_id,
    next_event,
    opened,
    working_spec,
)

# Pidfd readiness and child reaping go through the loop: check the default one and uvloop.
pytestmark = pytest.mark.both_loops

# The working app: GET /env answers its environment as JSON, GET /say/WORDS prints WORDS on
# stdout. --exit CODE exits at once;
# --ignore-term ignores SIGTERM; --spawn-child PIDFILE starts a child that ignores SIGTERM and
# writes its pid to PIDFILE once it does.
APP = """\
import http.server, json, os, signal, subprocess, sys

CHILD = (
    "import os, signal, sys\\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    "open(sys.argv[1] + '.partial', 'w').write(str(os.getpid()))\\n"
    "os.rename(sys.argv[1] + '.partial', sys.argv[1])\\n"
    "while True: signal.pause()\\n"
)

args = sys.argv[1:]
if "--exit" in args:
    sys.exit(int(args[args.index("--exit") + 1]))
if "--ignore-term" in args:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if "--spawn-child" in args:
    subprocess.Popen([sys.executable, "-c", CHILD, args[args.index("--spawn-child") + 1]])


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/say/"):
            print(self.path[len("/say/"):], flush=True)
        status, body = (200, json.dumps(dict(os.environ)).encode()) if self.path == "/env" else (
            404, b"")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


server = http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler)
print("app listening on", os.environ["PORT"], flush=True)
print("app says hello on stderr", file=sys.stderr, flush=True)
server.serve_forever()
"""


class ProcessHarness(RuntimeHarness):
    """The app above, run with this interpreter on a free port."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.app = tmp_path / "app.py"
        self.app.write_text(f"#!{sys.executable}\n{APP}")

    def runtime(self) -> ProcessRuntime:
        return ProcessRuntime(self.state_dir)

    def app_spec(
        self,
        *,
        instance_id: str,
        env: dict[str, str],
        secret_names: tuple[str, ...],
        args: tuple[str, ...] = (),
    ) -> LaunchSpec:
        port = free_port()
        return LaunchSpec(
            service=SERVICE,
            revision="rev1",
            instance_id=instance_id,
            command=(sys.executable, "-u", str(self.app), *args),
            env={**env, "PORT": str(port)},
            port=port,
            network_mode="host",
            workdir=str(self.tmp_path),
            secret_names=secret_names,
        )

    def crash_spec(self, *, instance_id: str, exit_code: int) -> LaunchSpec:
        env = {"TIDEGATE_SERVICE": SERVICE, "TIDEGATE_INSTANCE": instance_id}
        args = ("--exit", str(exit_code))
        return self.app_spec(instance_id=instance_id, env=env, secret_names=(), args=args)

    def failing_spec(self, runtime: Runtime, *, instance_id: str) -> tuple[LaunchSpec, str]:
        missing = str(self.tmp_path / "no-such-command")
        spec = LaunchSpec(
            service=SERVICE, revision="rev1", instance_id=instance_id, command=(missing,)
        )
        return spec, missing

    async def start_talking(
        self, runtime: Runtime, *, instance_id: str
    ) -> tuple[InstanceInfo, set[tuple[str, str]]]:
        env = {"TIDEGATE_SERVICE": SERVICE, "TIDEGATE_INSTANCE": instance_id}
        spec = self.app_spec(instance_id=instance_id, env=env, secret_names=())
        info = await runtime.start(spec)
        # the app's own two lines at start, stdout and stderr in the one file
        port = spec.env["PORT"]
        return info, {
            ("output", f"app listening on {port}"),
            ("output", "app says hello on stderr"),
        }

    def kill_leftovers(self) -> None:
        for path in (self.state_dir / "instances").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                record = json.loads(path.read_text())
                if record["pid"] != os.getpid() and record["pgid"] != os.getpgrp():
                    os.killpg(record["pgid"], signal.SIGKILL)


class FakeHarness(RuntimeHarness):
    """The fake: its "app" is the spec it recorded; crashes and failures are set up on it."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.host = FakeHost()
        self.runtimes: list[FakeRuntime] = []

    def runtime(self) -> FakeRuntime:
        runtime = FakeRuntime(self.host)
        self.runtimes.append(runtime)
        return runtime

    def app_spec(
        self, *, instance_id: str, env: dict[str, str], secret_names: tuple[str, ...]
    ) -> LaunchSpec:
        return LaunchSpec(
            service=SERVICE,
            revision="rev1",
            instance_id=instance_id,
            image="app:1",
            env={**env, "PORT": "8080"},
            secret_names=secret_names,
        )

    def crash_spec(self, *, instance_id: str, exit_code: int) -> LaunchSpec:
        return self.app_spec(instance_id=instance_id, env={}, secret_names=())

    async def start_crashing(
        self, runtime: Runtime, *, instance_id: str, exit_code: int
    ) -> InstanceInfo:
        assert isinstance(runtime, FakeRuntime)
        info = await super().start_crashing(runtime, instance_id=instance_id, exit_code=exit_code)
        runtime.crash(instance_id, exit_code)
        return info

    def failing_spec(self, runtime: Runtime, *, instance_id: str) -> tuple[LaunchSpec, str]:
        assert isinstance(runtime, FakeRuntime)
        runtime.fail_next_start("no such image: app:missing")
        spec = self.app_spec(instance_id=instance_id, env={}, secret_names=())
        return spec, "no such image: app:missing"

    async def start_talking(
        self, runtime: Runtime, *, instance_id: str
    ) -> tuple[InstanceInfo, set[tuple[str, str]]]:
        assert isinstance(runtime, FakeRuntime)
        info = await runtime.start(self.app_spec(instance_id=instance_id, env={}, secret_names=()))
        runtime.write(instance_id, "hello on stdout")
        runtime.write(instance_id, "oops on stderr", "stderr")
        return info, {("stdout", "hello on stdout"), ("stderr", "oops on stderr")}

    async def check_answers(self, info: InstanceInfo) -> None:
        assert info.address is not None
        host, _, port = info.address.rpartition(":")
        assert host == "127.0.0.1" and int(port) >= 20000

    async def app_env(self, info: InstanceInfo) -> dict[str, str]:
        launched = [s for r in self.runtimes for s in r.launched]
        return next(dict(s.env) for s in launched if s.instance_id == info.instance_id)


@pytest.fixture(params=["process", "fake"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> RuntimeHarness:
    """Each runtime the contract runs against."""
    return ProcessHarness(tmp_path) if request.param == "process" else FakeHarness(tmp_path)


@pytest.fixture
def processes(tmp_path: Path) -> ProcessHarness:
    """The process runtime's harness, for the tests only it passes."""
    return ProcessHarness(tmp_path)


class TestRuntimeContract(RuntimeContract):
    """The shared Runtime contract, for the process runtime and the fake."""


def app(processes: ProcessHarness, *args: str, env: dict[str, str] | None = None) -> LaunchSpec:
    """The test app with these flags, under a new id."""
    base = working_spec(processes, env)
    return processes.app_spec(
        instance_id=base.instance_id, env=dict(base.env), secret_names=base.secret_names, args=args
    )


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def start_ticks(pid: int) -> int:
    """When `pid` started, in clock ticks after boot (/proc/<pid>/stat field 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rfind(")") + 2 :].split()[19])


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls a cheap condition until it holds; fails after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_stop_kills_the_whole_process_group(processes: ProcessHarness) -> None:
    """stop() also kills a child the app spawned, even one that ignores SIGTERM."""
    pidfile = processes.tmp_path / "child.pid"
    child_pid = 0
    try:
        async with opened(processes) as runtime:
            spec = app(processes, "--spawn-child", str(pidfile))
            await processes.check_answers(await runtime.start(spec))
            await until(pidfile.exists, "the app's child to start")
            child_pid = int(pidfile.read_text())
            assert alive(child_pid)
            await runtime.stop(spec.instance_id, grace=5.0)
            await until(lambda: not alive(child_pid), "the app's child to die")
    finally:
        if child_pid and alive(child_pid):
            os.kill(child_pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("flags", "grace", "exit_code", "min_seconds"),
    [
        pytest.param((), 30.0, 128 + signal.SIGTERM, 0.0, id="exits-on-sigterm"),
        pytest.param(("--ignore-term",), 0.5, 128 + signal.SIGKILL, 0.5, id="ignores-sigterm"),
    ],
)
async def test_stop_waits_for_exit_up_to_grace(
    processes: ProcessHarness,
    flags: tuple[str, ...],
    grace: float,
    exit_code: int,
    min_seconds: float,
) -> None:
    """stop() returns as soon as the app exits on SIGTERM, and SIGKILLs it after `grace`."""
    async with opened(processes) as runtime:
        events = runtime.events()
        spec = app(processes, *flags)
        info = await runtime.start(spec)
        await processes.check_answers(info)  # also: the app has set up its SIGTERM handling
        loop = asyncio.get_running_loop()
        began = loop.time()
        await runtime.stop(spec.instance_id, grace=grace)
        elapsed = loop.time() - began
        assert min_seconds <= elapsed < min_seconds + 5.0
        event = await next_event(events, "removed", spec.instance_id)
        assert event.exit_code == exit_code
        assert info.address is not None
        with pytest.raises(OSError):
            await asyncio.open_connection(*info.address.split(":"))


async def test_secrets_stay_out_of_records_and_logs(
    processes: ProcessHarness, caplog: pytest.LogCaptureFixture
) -> None:
    """A secret reaches the app but never the records file, the instance log or the runtime's
    log; the app's stdout and stderr do reach the instance log."""
    caplog.set_level(logging.DEBUG)
    secret = f"s3cret-{uuid.uuid4().hex}"
    async with opened(processes) as runtime:
        spec = app(processes, env={"DB_PASSWORD": secret})
        info = await runtime.start(spec)
        assert (await processes.app_env(info))["DB_PASSWORD"] == secret
        records = list((processes.state_dir / "instances").glob("*.json"))
        assert [p.stem for p in records] == [spec.instance_id]
        assert isinstance(runtime, ProcessRuntime)
        log = runtime.log_path(spec.instance_id)
        await until(lambda: b"on stderr" in log.read_bytes(), "the app's output in its log")
        assert b"app listening on" in log.read_bytes()
        for path in processes.state_dir.rglob("*"):
            if path.is_file():
                assert secret.encode() not in path.read_bytes(), path
        await runtime.stop(spec.instance_id)
    assert secret not in caplog.text
    assert spec.instance_id in caplog.text  # the runtime did log, just not the secret


async def test_stale_records_are_dropped_and_never_signalled(processes: ProcessHarness) -> None:
    """A new runtime drops records of dead processes, of reused pids and unreadable ones,
    without adopting or signalling anything."""
    records = processes.state_dir / "instances"
    # A bystander in a session of its own stands for a process that got a recorded pid later.
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import signal; signal.pause()"], start_new_session=True
    )
    try:
        async with opened(processes) as first:
            events = first.events()
            dead = new_id()
            await processes.start_crashing(first, instance_id=dead, exit_code=3)
            await next_event(events, "exited", dead)
            reused = json.loads((records / f"{dead}.json").read_text())
            reused.update(
                instance_id=new_id(),
                pid=bystander.pid,
                pgid=bystander.pid,
                start_ticks=start_ticks(bystander.pid) + 1,  # launched a tick before it
            )
            (records / f"{reused['instance_id']}.json").write_text(json.dumps(reused))
            (records / f"{new_id()}.json").write_text("{not json")
            async with opened(processes) as second:
                assert await second.list() == []
                assert list(records.iterdir()) == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


async def test_only_path_home_and_lang_are_inherited(
    processes: ProcessHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app gets PATH from the scaler's environment but none of its other variables."""
    monkeypatch.setenv("TIDEGATE_SCALER_ONLY", "private")
    async with opened(processes) as runtime:
        seen = await processes.app_env(await runtime.start(app(processes)))
        assert seen["PATH"] == os.environ["PATH"]
        assert "TIDEGATE_SCALER_ONLY" not in seen


@pytest.mark.parametrize(
    ("problem", "expected"),
    [
        pytest.param("not-executable", "Permission denied", id="not-executable"),
        pytest.param("no-workdir", "no such working directory", id="no-workdir"),
    ],
)
async def test_launch_errors_name_the_problem(
    processes: ProcessHarness, problem: str, expected: str
) -> None:
    """A command that cannot be executed, or a missing working directory, is a LaunchError
    naming it."""
    script = processes.tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    workdir = processes.tmp_path / "no-such-dir"
    spec = LaunchSpec(
        service=SERVICE,
        revision="rev1",
        instance_id=new_id(),
        command=(str(script),),
        workdir=str(workdir) if problem == "no-workdir" else None,
        env={"PORT": str(free_port())},
    )
    named = str(workdir) if problem == "no-workdir" else str(script)
    async with opened(processes) as runtime:
        with pytest.raises(LaunchError) as raised:
            await runtime.start(spec)
        assert expected in str(raised.value) and named in str(raised.value)
        assert await runtime.list() == []


async def test_a_command_found_on_path_runs(processes: ProcessHarness, tmp_path: Path) -> None:
    """A bare command name is looked up on the instance's PATH, and a relative one in workdir."""
    async with opened(processes) as runtime:
        events = runtime.events()
        (tmp_path / "app.py").chmod(0o755)
        for command in (("sh", "-c", "exit 7"), ("./app.py", "--exit", "7")):
            spec = LaunchSpec(
                service=SERVICE,
                revision="rev1",
                instance_id=new_id(),
                command=command,
                workdir=str(tmp_path),
                env={"PORT": str(free_port())},
            )
            await runtime.start(spec)
            assert (await next_event(events, "exited", spec.instance_id)).exit_code == 7


async def read_lines(runtime: Runtime, instance_id: str, count: int, **kw: float) -> list[str]:
    """The first ``count`` lines ``runtime.logs(instance_id, **kw)`` gives; the reader is
    closed after them (as a scaler that stops collecting)."""
    lines: list[str] = []
    reader = runtime.logs(instance_id, **kw)
    try:
        async with asyncio.timeout(10.0):
            async for line in reader:
                lines.append(line.line)
                if len(lines) == count:
                    break
    finally:
        await reader.aclose()  # type: ignore[attr-defined]
    return lines


async def test_a_new_runtime_continues_the_output_where_the_last_reader_stopped(
    processes: ProcessHarness,
) -> None:
    """A reader that stops saves its position: a restarted scaler's runtime, asked for the
    adopted instance's output since then, gives only the lines written after it; removing
    the instance removes its output files."""
    async with opened(processes) as first:
        spec = app(processes)
        info = await first.start(spec)
        await processes.check_answers(info)
        assert await read_lines(first, spec.instance_id, 2) == [
            f"app listening on {spec.env['PORT']}",
            "app says hello on stderr",
        ]
        assert info.address is not None
        assert (await http_get(info.address, "/say/while-no-scaler-reads"))[0] == 404
        async with opened(processes) as second:
            resumed = await read_lines(second, spec.instance_id, 1, since=time.time())
            assert resumed == ["while-no-scaler-reads"]
            assert isinstance(second, ProcessRuntime)
            output = second.log_path(spec.instance_id)
            assert output.exists() and output.with_suffix(".pos").exists()
            await second.stop(spec.instance_id)
            assert not output.exists() and not output.with_suffix(".pos").exists()


async def test_the_last_line_without_a_newline_is_given_and_the_reader_ends(
    processes: ProcessHarness,
) -> None:
    """An app that exits after a line with no newline: logs() gives that line too, and ends by
    itself once the process has exited; a line longer than 16 KiB comes in pieces."""
    long = "x" * (16 * 1024 + 10)
    spec = LaunchSpec(
        service=SERVICE,
        revision="rev1",
        instance_id=new_id(),
        command=("sh", "-c", f"echo first; echo {long}; printf 'no newline'; exit 3"),
        env={"PORT": str(free_port())},
    )
    async with opened(processes) as runtime:
        await runtime.start(spec)
        async with asyncio.timeout(10.0):
            lines = [line async for line in runtime.logs(spec.instance_id)]
        assert lines[0].line == "first"
        assert [line.line for line in lines[1:]] == [long[: 16 * 1024], "x" * 10, "no newline"]
        assert {line.stream for line in lines} == {"output"}
