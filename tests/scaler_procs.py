"""`tidegate up`, `tidegate scaler` and `tidegate ingress` as child processes on Docker, scoped.

The acceptance tests run the real command line as child processes. One thing is changed, and
only in the child: the Docker runtime the scaler makes gets **scope labels**, the test scope
(:data:`tests.images.TEST_SCOPE`) plus one of this test's own. Without them a scaler manages
every tidegate container on the host: at start it removes, as orphans, the containers of every
service its files do not name, which would remove a concurrent test's (or a real deployment's)
instances. With them it sees only this test's containers, and
:func:`tests.images.remove_test_containers` finds them after a failed run.

Run as ``python -m tests.scaler_procs ARGS...`` it is ``tidegate ARGS...`` with that change;
the scope comes from the environment variable :data:`SCOPE_ENV` (a JSON object).

Each daemon is started on free 127.0.0.1 ports, awaited until its ``GET /-/ready`` answers
200 (with a deadline), and stopped on the way out, also when the test fails: SIGTERM, then
SIGKILL after a grace period. Its stdout and stderr go to one file, shown when it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.images import TEST_SCOPE
from tests.procs import READY_TIMEOUT, REPO, free_port, stop

SCOPE_ENV = "TIDEGATE_TEST_DOCKER_SCOPE"
SCOPED_TIDEGATE = [sys.executable, "-m", "tests.scaler_procs"]
RUN_LABEL = "tidegate.test.run"  # the per-test scope label, next to TEST_SCOPE's
STOP_GRACE = 30.0  # seconds a daemon may take to drain and stop its instances on SIGTERM


def run_scope() -> dict[str, str]:
    """Scope labels for one test: the test scope and a label of its own."""
    return {**TEST_SCOPE, RUN_LABEL: secrets.token_hex(6)}


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 107 bytes; tmp_path may be longer)."""
    with tempfile.TemporaryDirectory(prefix="tg-", dir="/tmp") as path:
        yield Path(path)


@dataclass
class Daemon:
    """A running tidegate child and where to reach it."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    metrics_port: int | None = None
    port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.metrics_port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait(self, timeout: float) -> int:
        """The exit status, once the child has exited by itself within ``timeout`` seconds."""
        return await asyncio.wait_for(self.process.wait(), timeout)


async def wait_ready(daemon: Daemon, timeout: float = READY_TIMEOUT) -> None:
    """Poll GET /-/ready until 200; fail with the child's output if it exits or time runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while True:
            if daemon.process.returncode is not None:
                pytest.fail(
                    f"{daemon.name} exited with {daemon.process.returncode} before it was "
                    f"ready:\n{daemon.output()}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(daemon.metrics_url("/-/ready")) as response:
                    if response.status == 200:
                        return
            if loop.time() > deadline:
                pytest.fail(f"{daemon.name} was not ready within {timeout} s:\n{daemon.output()}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def daemon(
    name: str,
    argv: list[str],
    log: Path,
    *,
    scope: Mapping[str, str] | None,
    metrics_port: int,
    port: int | None = None,
    ready: bool = True,
    grace: float = STOP_GRACE,
) -> AsyncIterator[Daemon]:
    """Run ``tidegate ARGV...`` (scoped when ``scope`` is given) until the block ends; with
    ``ready``, first wait for its /-/ready. Stopped on the way out, also on failure."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    prefix: list[str] = [sys.executable, "-m", "tidegate"]
    if scope is not None:
        env[SCOPE_ENV] = json.dumps(dict(scope))
        prefix = SCOPED_TIDEGATE
    with log.open("ab") as sink:
        process = await asyncio.create_subprocess_exec(
            *prefix,
            *argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    child = Daemon(name, process, log, metrics_port=metrics_port, port=port)
    try:
        if ready:
            await wait_ready(child)
        yield child
    finally:
        await stop(process, grace)


def up_argv(
    files: list[Path], *, port: int, metrics_port: int, scaler_socket: Path, state_dir: Path
) -> list[str]:
    return [
        "up",
        *map(str, files),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        "--scaler-socket",
        str(scaler_socket),
        "--state-dir",
        str(state_dir),
    ]


@contextlib.asynccontextmanager
async def tidegate_up(
    files: list[Path], *, sockets: Path, logs: Path, scope: Mapping[str, str]
) -> AsyncIterator[Daemon]:
    """`tidegate up FILES...` on free ports with its scaler socket in ``sockets``; ready."""
    port, metrics_port = free_port(), free_port()
    socket_path = sockets / "scaler.sock"
    argv = up_argv(
        files,
        port=port,
        metrics_port=metrics_port,
        scaler_socket=socket_path,
        state_dir=sockets / "state",
    )
    async with daemon(
        "tidegate up",
        argv,
        logs / f"up-{port}.log",
        scope=scope,
        metrics_port=metrics_port,
        port=port,
    ) as child:
        child.extra["socket"] = socket_path
        yield child


# -- as a module: `tidegate` with a scoped Docker runtime -----------------------------------


def _scoped_main(argv: list[str]) -> int:
    scope = json.loads(os.environ.get(SCOPE_ENV) or "{}")
    if not isinstance(scope, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in scope.items()
    ):
        print(f"{SCOPE_ENV} must be a JSON object of strings", file=sys.stderr)
        return 2
    import scaler.runtimes.docker as docker_runtime

    base = docker_runtime.DockerRuntime

    class ScopedDockerRuntime(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, scope_labels: Mapping[str, str] | None = None, **kw: Any):
            super().__init__(*args, scope_labels={**scope, **(scope_labels or {})}, **kw)

    # scaler.daemon.make_runtime imports the class when it first needs one: it gets this one
    docker_runtime.DockerRuntime = ScopedDockerRuntime  # type: ignore[misc]
    from tidegate.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(_scoped_main(sys.argv[1:]))
