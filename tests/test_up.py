"""`tidegate up` for real: the hello example on the process runtime, as a child process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import aiohttp
import pytest

from tests.procs import REPO, TIDEGATE, IngressProcess, free_port, run_cli, stop, wait_ready

pytestmark = pytest.mark.slow

HELLO = str(REPO / "examples" / "hello" / "hello.yaml")


def pids_with_env(entry: bytes) -> list[int]:
    """Processes whose environment holds `entry` (NAME=value), among those we may read."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError):
            environ = Path(f"/proc/{name}/environ").read_bytes()
            if entry in environ.split(b"\0"):
                found.append(int(name))
    return found


async def test_up_cold_starts_from_zero_and_stops_cleanly(tmp_path: Path) -> None:
    """Run from another directory, the first request is served from zero instances (the app
    runs in its service file's directory), and SIGTERM exits 0 leaving no app process."""
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            *TIDEGATE,
            "up",
            HELLO,
            # its own state: never adopt (or remove as orphans) a real deployment's instances
            "--state-dir",
            str(tmp_path / "state"),
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}",
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    child = IngressProcess(process, port, metrics_port, log)
    marker = b""
    try:
        await wait_ready(child)
        timeout = aiohttp.ClientTimeout(total=20)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(child.url("/")) as response,
        ):
            body = await response.text()
        assert response.status == 200, child.output()
        assert body.startswith("hello from hello-"), body
        instance = body.split()[2].rstrip(",")
        marker = f"TIDEGATE_INSTANCE={instance}".encode()
        assert pids_with_env(marker), f"no process of {instance} found"
        process.send_signal(signal.SIGTERM)
        assert await child.wait(20.0) == 0, child.output()
        assert pids_with_env(marker) == []
    finally:
        await stop(process)
        for pid in pids_with_env(marker) if marker else []:  # left only if the test failed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_up_rejects_a_bad_file_before_starting_anything(tmp_path: Path) -> None:
    """A bad service file: exit 1 with the file, key path and reason, and nothing listens."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: bad\nruntime: process\ncommand: [python3, app.py]\n"
        "autoscaling: {min_size: 1, max_size: 0}\n"
    )
    port = free_port()
    result = run_cli(
        "up",
        str(bad),
        "--state-dir",
        str(tmp_path / "state"),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        "off",
    )
    assert result.returncode == 1, result.stderr
    assert f"{bad}: autoscaling.max_size: must be >= min_size (got 0 < 1)" in result.stderr
    assert "listening" not in result.stdout
