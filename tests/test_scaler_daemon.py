"""`tidegate scaler` beside `tidegate ingress`, as systemd runs them: readiness and reload.

The scaler is started with NOTIFY_SOCKET pointing at a datagram socket the test reads, with
the process runtime (no Docker). SIGHUP with a broken service file must keep the service
serving as it was and say why (status, STATUS=); with the file fixed, SIGHUP rolls it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import free_port, run_cli
from tests.scaler_procs import daemon, short_tmpdir
from tests.test_commands import APP, pids_with_env, service_text

pytestmark = pytest.mark.slow

DEADLINE = 15.0  # seconds for anything here that takes milliseconds when it works


class Notifications:
    """The datagrams a child sends to NOTIFY_SOCKET, in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.seen: list[str] = []

    async def until(self, predicate: Any, what: str) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE
        while True:
            try:
                message = self.sock.recv(4096).decode()
            except BlockingIOError:
                if loop.time() > deadline:
                    pytest.fail(f"no {what} within {DEADLINE} s; saw {self.seen}")
                await asyncio.sleep(0.01)
                continue
            self.seen.append(message)
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()


def status(socket_path: Path) -> dict[str, Any]:
    result = run_cli("status", "--json", "--socket", str(socket_path))
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


async def get(port: int) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.get(f"http://127.0.0.1:{port}/") as response,
    ):
        body = await response.text()
        assert response.status == 200, body
        return body


async def test_scaler_sighup_keeps_a_broken_file_out_and_applies_a_fixed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = secrets.token_hex(8)
    services = tmp_path / "services"
    services.mkdir()
    (services / "app.py").write_text(APP)
    hello = services / "hello.yaml"
    hello.write_text(service_text("hello", run))
    port = free_port()
    with short_tmpdir() as sockets:
        notes = Notifications(sockets / "notify")
        ingress_socket, scaler_socket = sockets / "ingress.sock", sockets / "scaler.sock"
        try:
            async with daemon(
                "tidegate ingress",
                [
                    "ingress",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--control-socket",
                    str(ingress_socket),
                    "--metrics-listen",
                    f"127.0.0.1:{(ingress_metrics := free_port())}",
                    "--no-access-log",
                ],
                tmp_path / "ingress.log",
                scope=None,
                metrics_port=ingress_metrics,
            ):
                monkeypatch.setenv("NOTIFY_SOCKET", str(sockets / "notify"))
                async with daemon(
                    "tidegate scaler",
                    [
                        "scaler",
                        str(services),
                        "--ingress-socket",
                        str(ingress_socket),
                        "--socket",
                        str(scaler_socket),
                        "--metrics-listen",
                        f"127.0.0.1:{(scaler_metrics := free_port())}",
                        "--state-dir",
                        str(tmp_path / "state"),
                        "--scope",
                        f"t{run}",
                    ],
                    tmp_path / "scaler.log",
                    scope=None,
                    metrics_port=scaler_metrics,
                ) as scaler:
                    monkeypatch.delenv("NOTIFY_SOCKET")
                    ready = await notes.until(lambda m: "READY=1" in m, "READY=1")
                    assert "1 service(s)" in ready
                    assert (await get(port)).endswith(" v1\n")
                    before = status(scaler_socket)["services"][0]

                    hello.write_text(
                        service_text("hello", run).replace("max_size: 2", "max_size: 0")
                    )
                    os.kill(scaler.pid, signal.SIGHUP)
                    await notes.until(lambda m: "RELOADING=1" in m, "RELOADING=1")
                    reported = await notes.until(lambda m: "READY=1" in m, "READY=1 again")
                    assert "not loaded" in reported and "hello.yaml" in reported, reported
                    report = status(scaler_socket)
                    assert "autoscaling.max_size" in report["errors"][0]["error"]
                    assert report["services"][0]["revision"] == before["revision"]
                    assert (await get(port)).endswith(" v1\n")

                    hello.write_text(service_text("hello", run, version="v2"))
                    os.kill(scaler.pid, signal.SIGHUP)
                    await notes.until(lambda m: "RELOADING=1" in m, "the second RELOADING=1")
                    reported = await notes.until(lambda m: "READY=1" in m, "READY=1 after it")
                    assert "not loaded" not in reported, reported
                    deadline = time.monotonic() + DEADLINE
                    while not (await get(port)).endswith(" v2\n"):
                        assert time.monotonic() < deadline, "v2 never served"
                    assert status(scaler_socket)["errors"] == []
        finally:
            notes.close()
            # the standalone scaler leaves its instances serving when it stops: end them
            for pid in pids_with_env(f"CMDTEST_RUN={run}"):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
