"""Daemons under test as child processes: started on free ports, awaited until ready, stopped.

A test that runs `tidegate ingress` for real gets it from :func:`ingress_process`, which starts
it with ``python -m tidegate``, waits for ``GET /-/ready`` to answer 200 (with a deadline) and,
on the way out, also when the test fails, stops it: SIGTERM, then SIGKILL after a grace period.
The child's stdout and stderr go to one file, shown when it fails to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parent.parent
TIDEGATE = [sys.executable, "-m", "tidegate"]
READY_TIMEOUT = 20.0  # seconds for a child to answer /-/ready (interpreter start and imports)
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL when a test stops a child
CLI_TIMEOUT = 20.0  # seconds for a command that should exit by itself


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now (bound to port 0, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """The kB-valued fields of /proc/<pid>/status, e.g. VmRSS (now) and VmHWM (peak)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `tidegate ARGS...` to its exit (killed past `timeout`), capturing its output."""
    return subprocess.run(
        [*TIDEGATE, *args],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass
class IngressProcess:
    """A running `tidegate ingress` child and where to reach it."""

    process: asyncio.subprocess.Process
    port: int
    metrics_port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait(self, timeout: float) -> int:
        """The exit status, once the child has exited by itself within `timeout` seconds."""
        return await asyncio.wait_for(self.process.wait(), timeout)


async def stop(process: asyncio.subprocess.Process, grace: float = STOP_GRACE) -> int:
    """SIGTERM, then SIGKILL if it is still running after `grace` seconds; the exit status."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode if process.returncode is not None else -1


async def wait_ready(child: IngressProcess, timeout: float = READY_TIMEOUT) -> None:
    """Poll GET /-/ready until 200; fail with the child's output if it exits or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    probe = aiohttp.ClientTimeout(total=1.0)
    async with aiohttp.ClientSession(timeout=probe) as session:
        while True:
            if child.process.returncode is not None:
                pytest.fail(
                    f"the ingress exited with {child.process.returncode} before it was ready:\n"
                    + child.output()
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(child.metrics_url("/-/ready")) as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                pytest.fail(f"the ingress was not ready within {timeout} s:\n" + child.output())
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def ingress_process(tmp_path: Path, *args: str) -> AsyncIterator[IngressProcess]:
    """`tidegate ingress ARGS...` on free 127.0.0.1 ports, ready; stopped on exit, also on
    failure."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path / f"ingress-{port}.log"
    argv = [
        *TIDEGATE,
        "ingress",
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        *args,
    ]
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            *argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT
        )
    child = IngressProcess(process, port, metrics_port, log)
    try:
        await wait_ready(child)
        yield child
    finally:
        await stop(process)
