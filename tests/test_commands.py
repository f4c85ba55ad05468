"""`tidegate status`, `apply`, `pause`, `resume` and `delete` against a real `tidegate up`.

Each test runs its own `tidegate up` child (process runtime, no Docker) on free ports with its
own state directory and scaler socket under ``tmp_path``, and drives it with the commands as
a user would. The service's app is a few lines of http.server written next to its file; it
answers with its service, instance and ``VERSION``, so a response says who served it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import (
    CLI_TIMEOUT,
    REPO,
    TIDEGATE,
    IngressProcess,
    free_port,
    run_cli,
    stop,
    wait_ready,
)

pytestmark = pytest.mark.slow

POLL_TIMEOUT = 15.0  # seconds for the scaler to get where a command sent it
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=20)  # a cold start included

APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        env = os.environ
        text = f"{env['TIDEGATE_SERVICE']} {env['TIDEGATE_INSTANCE']} {env['VERSION']}\\n"
        body = text.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), App).serve_forever()
"""

HEADER = ["SERVICE", "STATE", "READY", "STARTING", "DESIRED", "INFLIGHT", "QUEUED", "REQ/S", "P99"]


def service_text(
    name: str,
    run: str,
    *,
    version: str = "v1",
    max_size: int = 2,
    domains: list[str] | None = None,
) -> str:
    """A process service from zero; scale_down_delay is long enough that nothing scales down
    by itself while a test looks (the tests pause, apply and delete explicitly)."""
    lines = [
        f"name: {name}",
        "runtime: process",
        "command: [python3, app.py]",
    ]
    if domains:
        lines.append(f"domains: [{', '.join(domains)}]")
    lines += [
        "env:",
        f'  CMDTEST_RUN: "{run}"',  # marks this test's instances, for the safety net
        f'  VERSION: "{version}"',
        "autoscaling:",
        "  min_size: 0",
        f"  max_size: {max_size}",
        "  max_concurrency: 2",
        "  scale_down_delay: 30s",
        "health_check:",
        "  protocol: tcp",
    ]
    return "\n".join(lines) + "\n"


def pids_with_env(entry: str) -> list[int]:
    """Processes whose environment holds ``entry`` (NAME=value), among those we may read."""
    wanted = entry.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if wanted in Path(f"/proc/{name}/environ").read_bytes().split(b"\0"):
                found.append(int(name))
    return found


def wait_gone(entry: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll /proc until no process has ``entry`` in its environment."""
    deadline = time.monotonic() + timeout
    while pids := pids_with_env(entry):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {pids} with {entry} still run after {timeout} s")
        time.sleep(0.02)


@dataclass
class Up:
    """A running `tidegate up` child, the directory of its service files, and its socket."""

    child: IngressProcess
    dir: Path
    socket: Path
    run: str

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--socket", str(self.socket))

    def status_json(self, *service: str) -> dict[str, Any]:
        result = self.cli("status", *service, "--json")
        assert result.returncode == 0, result.stderr + self.child.output()
        report: dict[str, Any] = json.loads(result.stdout)
        return report

    def service(self, name: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = [
            s for s in self.status_json()["services"] if s["name"] == name
        ]
        assert len(found) == 1, found
        return found[0]

    def poll(
        self, name: str, predicate: Callable[[dict[str, Any]], bool], what: str
    ) -> dict[str, Any]:
        """`status --json` again and again until ``predicate`` holds for the service."""
        deadline = time.monotonic() + POLL_TIMEOUT
        while True:
            service = self.service(name)
            if predicate(service):
                return service
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}; last status: {service}")

    def write(self, file: str, text: str) -> Path:
        path = self.dir / file
        path.write_text(text)
        return path

    async def get(self, host: str | None = None) -> str:
        """GET / through the ingress; the body, after checking the status is 200."""
        headers = {"Host": host} if host else None
        async with (
            aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session,
            session.get(self.child.url("/"), headers=headers) as response,
        ):
            body = await response.text()
        assert response.status == 200, body + self.child.output()
        return body


@contextlib.asynccontextmanager
async def tidegate_up(tmp_path: Path, name: str = "hello") -> AsyncIterator[Up]:
    """`tidegate up` for one service file ``<name>.yaml`` (version v1), ready; stopped on
    exit, also on failure, and any instance it leaves behind is killed."""
    run = uuid.uuid4().hex
    services = tmp_path / "services"
    services.mkdir()
    (services / "app.py").write_text(APP)
    first = services / f"{name}.yaml"
    first.write_text(service_text(name, run))
    port, metrics_port = free_port(), free_port()
    sock = tmp_path / "s.sock"
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "up",
            str(first),
            "--state-dir",
            str(tmp_path / "state"),
            "--scaler-socket",
            str(sock),
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
    try:
        await wait_ready(child)
        yield Up(child, services, sock, run)
    finally:
        code = await stop(process)
        leftover = pids_with_env(f"CMDTEST_RUN={run}")
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert code == 0, child.output()
    assert leftover == [], "tidegate up left instances running"
    assert not sock.exists(), "tidegate up left its scaler socket"


def table(stdout: str) -> dict[str, list[str]]:
    """The status table's rows by service name, after checking its header."""
    lines = stdout.splitlines()
    assert lines[0].split() == HEADER, stdout
    rows = {}
    for line in lines[1:]:
        if not line.strip():
            break  # the detail section follows
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def served_by(body: str) -> tuple[str, str, str]:
    """(service, instance, version) from the app's answer."""
    service, instance, version = body.split()
    return service, instance, version


async def test_status_idle_then_running_with_detail(tmp_path: Path) -> None:
    async with tidegate_up(tmp_path) as up:
        result = up.cli("status")
        assert result.returncode == 0, result.stderr
        assert table(result.stdout) == {"hello": ["idle", "0", "0", "0", "0", "0", "0.0", "-"]}

        service, instance, version = served_by(await up.get())
        assert (service, version) == ("hello", "v1")
        assert instance.startswith("hello-")

        status = up.service("hello")
        assert (status["state"], status["ready"], status["desired"]) == ("running", 1, 1)
        [inst] = status["instances"]
        assert (inst["id"], inst["state"], inst["current"]) == (instance, "ready", True)
        assert re.fullmatch(r"127\.0\.0\.1:\d+", inst["address"]), inst
        # the request is in the recent history the status reports
        assert status["requests_per_second"] > 0
        assert status["p99_seconds"] is not None and status["p99_seconds"] > 0
        assert status["scale_events"] == {"up": 1, "down": 0}

        result = up.cli("status", "hello")
        assert result.returncode == 0, result.stderr
        rows = table(result.stdout)
        assert rows["hello"][:4] == ["running", "1", "0", "1"]
        detail = result.stdout
        assert f"service hello (process, revision {status['revision']})" in detail
        assert "routes: the default route" in detail
        assert "size: min 0, max 2, 2 requests per instance" in detail
        assert "scale events: 1 up, 0 down" in detail
        assert re.search(r"\d+s ago: scaled up 0 -> 1: cold start", detail), detail
        assert re.search(rf"instance {instance}  ready  {inst['address']}  0 in flight", detail)

        result = up.cli("status", "nope")
        assert result.returncode == 1
        assert result.stdout == ""
        assert "tidegate status: unknown service 'nope'" in result.stderr


async def test_pause_stops_instances_and_a_request_still_gets_served(tmp_path: Path) -> None:
    async with tidegate_up(tmp_path) as up:
        _, first, _ = served_by(await up.get())
        assert pids_with_env(f"TIDEGATE_INSTANCE={first}")

        result = up.cli("pause", "hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello: paused; the next request starts an instance again\n"
        up.poll(
            "hello",
            lambda s: s["state"] == "paused" and s["ready"] == 0 and s["instances"] == [],
            "the paused service to have no instances",
        )
        wait_gone(f"TIDEGATE_INSTANCE={first}")

        # paused is not off: a request cold-starts a new instance
        service, second, _ = served_by(await up.get())
        assert service == "hello"
        assert second != first

        result = up.cli("resume", "hello")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "hello: resumed (min_size 0)\n"
        status = up.service("hello")
        assert (status["state"], status["ready"]) == ("running", 1)
        assert [i["id"] for i in status["instances"]] == [second]

        for command in ("pause", "resume"):
            result = up.cli(command, "nope")
            assert result.returncode == 1
            assert f"tidegate {command}: unknown service 'nope'" in result.stderr


async def test_apply_replaces_updates_and_rejects(tmp_path: Path) -> None:
    async with tidegate_up(tmp_path) as up:
        hello = up.dir / "hello.yaml"
        _, old, _ = served_by(await up.get())
        before = up.service("hello")

        # env changed: what an instance is made of, so a new revision rolls out
        up.write("hello.yaml", service_text("hello", up.run, version="v2"))
        result = up.cli("apply", str(hello))
        assert result.returncode == 0, result.stderr
        match = re.fullmatch(r"hello: replaced \(revision ([0-9a-f]{12})\)\n", result.stdout)
        assert match, result.stdout
        revision = match.group(1)
        assert revision != before["revision"]
        replaced = up.poll(
            "hello",
            lambda s: s["ready"] >= 1 and all(i["current"] for i in s["instances"]),
            "the old revision's instance to be drained",
        )
        assert replaced["revision"] == revision
        assert old not in [i["id"] for i in replaced["instances"]]
        wait_gone(f"TIDEGATE_INSTANCE={old}")
        _, new, version = served_by(await up.get())
        assert (version, new != old) == ("v2", True)

        # scaling only: applied in place, same revision, same instance
        up.write("hello.yaml", service_text("hello", up.run, version="v2", max_size=3))
        result = up.cli("apply", str(hello))
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"hello: updated (revision {revision})\n"
        updated = up.service("hello")
        assert (updated["max_size"], updated["revision"]) == (3, revision)
        assert [i["id"] for i in updated["instances"]] == [new]

        # the same once more changes nothing
        result = up.cli("apply", str(hello))
        assert result.stdout == f"hello: unchanged (revision {revision})\n"

        # a bad edit: rejected with file, key path and reason; nothing changes
        up.write("hello.yaml", service_text("hello", up.run, version="v3", max_size=0))
        result = up.cli("apply", str(hello))
        assert result.returncode == 1
        assert result.stdout == ""
        assert (
            f"tidegate apply: {hello}: autoscaling.max_size: must be between 1 and 25 (got 0)"
            in result.stderr
        )
        after = up.service("hello")
        assert (after["max_size"], after["revision"]) == (3, revision)
        assert [i["id"] for i in after["instances"]] == [new]

        # a second service wanting the default route too: rejected, naming the clash
        other = up.write("other.yaml", service_text("other", up.run))
        result = up.cli("apply", str(other))
        assert result.returncode == 1
        assert (
            f"{other}: domains: none given, but service hello in {hello} already takes the "
            "default route" in result.stderr
        )
        assert [s["name"] for s in up.status_json()["services"]] == ["hello"]
        assert served_by(await up.get())[:2] == ("hello", new)

        result = up.cli("apply", str(up.dir / "missing.yaml"))
        assert result.returncode == 1
        assert "missing.yaml: cannot read" in result.stderr


async def test_apply_creates_and_delete_removes(tmp_path: Path) -> None:
    async with tidegate_up(tmp_path) as up:
        web = up.write("web.yaml", service_text("web", up.run, domains=["web.test"]))
        result = up.cli("apply", str(web))
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"web: created \(revision [0-9a-f]{12}\)\n", result.stdout)

        result = up.cli("status")
        assert result.returncode == 0, result.stderr
        rows = table(result.stdout)
        assert sorted(rows) == ["hello", "web"]
        assert rows["web"][0] == "idle"

        service, instance, _ = served_by(await up.get(host="web.test"))
        assert service == "web"
        assert up.service("web")["domains"] == ["web.test"]

        result = up.cli("delete", "web")
        assert result.returncode == 0, result.stderr
        assert result.stdout == "web: deleted\n"
        assert [s["name"] for s in up.status_json()["services"]] == ["hello"]
        assert pids_with_env(f"TIDEGATE_INSTANCE={instance}") == []
        # its route is gone: the domain falls through to the default service
        assert served_by(await up.get(host="web.test"))[0] == "hello"

        result = up.cli("delete", "web")
        assert result.returncode == 1
        assert "tidegate delete: unknown service 'web'" in result.stderr


def test_commands_without_a_scaler_say_so(tmp_path: Path) -> None:
    """Every command, with nothing on its socket: exit 1, naming the socket."""
    sock = tmp_path / "none.sock"
    file = tmp_path / "svc.yaml"
    file.write_text(service_text("svc", "unused"))
    commands = {
        "status": [],
        "apply": [str(file)],
        "pause": ["svc"],
        "resume": ["svc"],
        "delete": ["svc"],
    }
    children = {
        command: subprocess.Popen(
            [*TIDEGATE, command, *args, "--socket", str(sock)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command, args in commands.items()
    }
    try:
        for command, child in children.items():
            stdout, stderr = child.communicate(timeout=CLI_TIMEOUT)
            assert child.returncode == 1, (command, stderr)
            assert stdout == ""
            assert stderr.startswith(f"tidegate {command}: cannot reach the scaler on {sock}")
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()


async def read_frames(stream: asyncio.StreamReader, count: int) -> list[list[str]]:
    """``count`` frames of `status --watch` from a pipe: the lines after each separator."""
    frames: list[list[str]] = []
    async with asyncio.timeout(POLL_TIMEOUT):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"the watch ended after {len(frames)} frame(s)"
            if line.startswith("--- "):
                if len(frames) == count:
                    return frames
                frames.append([])
            elif frames:
                frames[-1].append(line.rstrip("\n"))


async def test_status_watch_redraws_until_interrupted(tmp_path: Path) -> None:
    """`status --watch` into a pipe prints a separator and the table each interval, with the
    service's detail when named; SIGINT ends it with 0 and no traceback."""
    async with tidegate_up(tmp_path) as up:
        await up.get()
        watch = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "status",
            "hello",
            "--watch",
            "--interval",
            "200ms",
            "--socket",
            str(up.socket),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert watch.stdout is not None and watch.stderr is not None
            frames = await read_frames(watch.stdout, 2)
            for frame in frames:
                rows = table("\n".join(frame))
                assert rows["hello"][:4] == ["running", "1", "0", "1"]
                assert "service hello (process, revision" in "\n".join(frame)
            watch.send_signal(signal.SIGINT)
            async with asyncio.timeout(CLI_TIMEOUT):
                code = await watch.wait()
            stderr = (await watch.stderr.read()).decode()
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
        assert code == 0, stderr
        assert "Traceback" not in stderr
        assert stderr == ""


async def test_status_watch_says_when_the_scaler_goes(tmp_path: Path) -> None:
    """A watch whose scaler stops says so on stderr and exits 1."""
    async with tidegate_up(tmp_path) as up:
        watch = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "status",
            "--watch",
            "--interval",
            "100ms",
            "--socket",
            str(up.socket),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert watch.stdout is not None and watch.stderr is not None
        try:
            await read_frames(watch.stdout, 1)
        except BaseException:
            watch.kill()
            await watch.wait()
            raise
    try:
        async with asyncio.timeout(CLI_TIMEOUT):
            _, stderr_bytes = await watch.communicate()
    finally:
        if watch.returncode is None:
            watch.kill()
            await watch.wait()
    stderr = stderr_bytes.decode()
    assert watch.returncode == 1, stderr
    assert stderr.startswith(f"tidegate status: lost the scaler on {up.socket}"), stderr
    assert "Traceback" not in stderr


async def test_status_watch_clears_a_terminal(tmp_path: Path) -> None:
    """On a terminal, `status --watch` clears the screen (ANSI) before each table instead."""
    async with tidegate_up(tmp_path) as up:
        primary, secondary = pty.openpty()
        watch = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "status",
            "--watch",
            "--interval",
            "100ms",
            "--socket",
            str(up.socket),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=secondary,
            stderr=subprocess.PIPE,
        )
        os.close(secondary)
        seen = b""
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(POLL_TIMEOUT):
                while seen.count(b"\x1b[H\x1b[2J") < 2:
                    seen += await loop.run_in_executor(None, os.read, primary, 4096)
            watch.send_signal(signal.SIGINT)
            async with asyncio.timeout(CLI_TIMEOUT):
                assert await watch.wait() == 0
        finally:
            if watch.returncode is None:
                watch.kill()
                await watch.wait()
            os.close(primary)
        text = seen.decode(errors="replace")
        assert "tidegate status, every 0.1s" in text
        assert "--- " not in text
        assert text.split("\x1b[H\x1b[2J")[1].splitlines()[2].split() == HEADER


def test_status_watch_usage_and_no_scaler(tmp_path: Path) -> None:
    """A bad --interval is a usage error (2); a watch with no scaler to start with is 1."""
    sock = tmp_path / "none.sock"
    for interval in ("soon", "0s", "10ms"):
        result = run_cli("status", "--watch", "--interval", interval, "--socket", str(sock))
        assert result.returncode == 2, result.stderr
        assert "--interval" in result.stderr
    result = run_cli("status", "--watch", "--socket", str(sock))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"tidegate status: cannot reach the scaler on {sock}")


def poll_report(up: Up, predicate: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        report = up.status_json()
        if predicate(report):
            return report
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; last status: {report}")


async def test_sighup_keeps_serving_past_a_broken_file_and_applies_a_fixed_one(
    tmp_path: Path,
) -> None:
    """SIGHUP re-reads the service files: a broken one is reported (status errors) and its
    service goes on as it was; once fixed, the next SIGHUP rolls the change out."""
    async with tidegate_up(tmp_path) as up:
        assert (await up.get()).endswith(" v1\n")
        before = up.service("hello")
        up.write("hello.yaml", service_text("hello", up.run).replace("max_size: 2", "max_size: 0"))
        os.kill(up.child.pid, signal.SIGHUP)
        report = poll_report(up, lambda r: bool(r["errors"]), "the broken file reported")
        assert "hello.yaml: autoscaling.max_size" in report["errors"][0]["error"], report
        assert up.service("hello")["revision"] == before["revision"]
        assert (await up.get()).endswith(" v1\n")

        up.write("hello.yaml", service_text("hello", up.run, version="v2"))
        os.kill(up.child.pid, signal.SIGHUP)
        poll_report(
            up,
            lambda r: not r["errors"] and r["services"][0]["revision"] != before["revision"],
            "the fixed file applied",
        )
        deadline = time.monotonic() + POLL_TIMEOUT
        while not (await up.get()).endswith(" v2\n"):  # the new revision takes over
            assert time.monotonic() < deadline, "v2 never served"


async def test_a_cold_start_shows_in_server_timing(tmp_path: Path) -> None:
    """The first request to a service at zero waits for an instance: its Server-Timing says
    how long, next to the cold start status reports; the next request waits for nothing."""
    async with tidegate_up(tmp_path) as up:
        timings = []
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            for _ in range(2):
                async with session.get(up.child.url("/")) as response:
                    assert response.status == 200
                    timings.append(response.headers["Server-Timing"])
        waits = []
        for timing in timings:
            match = re.fullmatch(r"queue;dur=([\d.]+), upstream;dur=([\d.]+)", timing)
            assert match is not None, timing
            waits.append(float(match.group(1)))
        cold = up.service("hello")["last_cold_start_seconds"]
        assert waits[0] > 10.0  # a process start: tens of milliseconds at least
        assert waits[0] >= cold * 1000 - 5.0  # held at least as long as the instance took
        assert waits[1] < 5.0
