"""The metrics as Prometheus itself sees them (issue "Observability").

Two checks, each against the real command line run as child processes (process runtime, no
Docker), with a few lines of http.server as the service's app:

- ``promtool check metrics`` lints the ``/metrics`` body of `tidegate up` and of
  `tidegate ingress` and `tidegate scaler` run apart, after traffic that gives every family
  samples; the families of the contract (section 5) are there with their types, each on its
  own daemon.
- Debian's ``prometheus`` scrapes `tidegate up` every second while known traffic goes
  through it (20 answered 200, 5 answered 404, 3 answered 500); its query API must then report
  exactly those counts, and the instance gauges `tidegate status --json` agrees with.

Skipped, with the reason, when ``promtool`` / ``prometheus`` are not installed
(``tests/setup.sh`` installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.procs import REPO, TIDEGATE, free_port, run_cli, stop

pytestmark = pytest.mark.slow

READY_TIMEOUT = 20.0  # seconds for a child to answer its readiness check
CONVERGE_TIMEOUT = 30.0  # seconds for Prometheus's answers to reach the expected values
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=20)  # a cold start included
PROMTOOL_TIMEOUT = 20.0

SERVICE = "hello"

# The contract's families (section 5), by the name on their `# TYPE` line in the text format.
INGRESS_FAMILIES = {
    "tidegate_requests_total": "counter",
    "tidegate_request_duration_seconds": "histogram",
    "tidegate_inflight_requests": "gauge",
    "tidegate_queued_requests": "gauge",
    "tidegate_queue_wait_seconds": "histogram",
    "tidegate_upstream_errors_total": "counter",
}
SCALER_FAMILIES = {
    "tidegate_instances": "gauge",
    "tidegate_desired_instances": "gauge",
    "tidegate_cold_start_seconds": "histogram",
    "tidegate_scale_events_total": "counter",
    "tidegate_instance_seconds_total": "counter",
}

# The app: 200 on most paths, 404 on /missing, 500 on /boom, and on /garbage bytes that are
# no HTTP response (an upstream error for the ingress to count, answered 502).
APP = """\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class App(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/garbage":
            self.wfile.write(b"this is not HTTP\\r\\n\\r\\n")
            self.wfile.flush()
            self.close_connection = True
            return
        status = {"/missing": 404, "/boom": 500}.get(self.path, 200)
        body = f"{os.environ['TIDEGATE_INSTANCE']} {status}\\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), App).serve_forever()
"""


def service_text(run: str) -> str:
    """A process service from zero; nothing scales down by itself while a test looks."""
    return "\n".join(
        [
            f"name: {SERVICE}",
            "runtime: process",
            "command: [python3, app.py]",
            "env:",
            f'  PROMTEST_RUN: "{run}"',  # marks this test's instances, for the safety net
            "autoscaling:",
            "  min_size: 0",
            "  max_size: 2",
            "  max_concurrency: 4",
            "  scale_down_delay: 10m",
            "health_check:",
            "  protocol: tcp",
            "",
        ]
    )


# -- children ---------------------------------------------------------------------------------


@dataclass
class Child:
    """A running child process, its log, and the URL that says it is ready."""

    name: str
    process: asyncio.subprocess.Process
    log: Path
    ready_url: str

    def output(self) -> str:
        return f"--- {self.name} ({self.log}) ---\n" + self.log.read_text(errors="replace")


@dataclass
class World:
    """One test's files, children and instance marker; everything stopped by :func:`world`."""

    dir: Path
    sockets: Path
    run: str = field(default_factory=lambda: uuid.uuid4().hex)
    children: list[Child] = field(default_factory=list)

    def service_file(self) -> Path:
        services = self.dir / "services"
        services.mkdir(exist_ok=True)
        (services / "app.py").write_text(APP)
        path = services / f"{SERVICE}.yaml"
        path.write_text(service_text(self.run))
        return path

    async def spawn(self, name: str, argv: list[str], ready_url: str) -> Child:
        log = self.dir / f"{name.replace(' ', '-')}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        child = Child(name, process, log, ready_url)
        self.children.append(child)
        return child

    async def tidegate(self, name: str, *args: str, metrics_port: int) -> Child:
        return await self.spawn(
            name, [*TIDEGATE, *args], f"http://127.0.0.1:{metrics_port}/-/ready"
        )

    def logs(self) -> str:
        return "\n".join(child.output() for child in self.children)


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A short directory for unix sockets (sun_path holds 107 bytes; tmp_path may be longer)."""
    with tempfile.TemporaryDirectory(prefix="tg-prom-", dir="/tmp") as path:
        yield Path(path)


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


async def kill_instances(run: str, grace: float = 5.0) -> None:
    """SIGTERM this test's instances, SIGKILL what is left after ``grace`` seconds."""
    entry = f"PROMTEST_RUN={run}"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_with_env(entry)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids_with_env(entry) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Stops every child on the way out (last started first; SIGTERM, then SIGKILL after a
    grace period), also on failure, and kills any instance of the test left running."""
    with short_tmpdir() as sockets:
        w = World(tmp_path, sockets)
        try:
            yield w
        finally:
            for child in reversed(w.children):
                await stop(child.process)
            await kill_instances(w.run)


async def wait_ready(w: World, *children: Child, timeout: float = READY_TIMEOUT) -> None:
    """Poll each child's readiness URL until 200; fail with the logs if one exits or time
    runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        for child in children:
            while True:
                if child.process.returncode is not None:
                    pytest.fail(
                        f"{child.name} exited with {child.process.returncode} before it was "
                        f"ready:\n{w.logs()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(child.ready_url) as response:
                        if response.status == 200:
                            break
                if loop.time() > deadline:
                    pytest.fail(f"{child.name} was not ready within {timeout} s:\n{w.logs()}")
                await asyncio.sleep(0.05)


async def traffic(port: int, paths: list[str]) -> list[int]:
    """GET each path through the ingress in turn; the statuses."""
    statuses = []
    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        for path in paths:
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                await response.read()
                statuses.append(response.status)
    return statuses


async def fetch(url: str) -> str:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        session.get(url) as response,
    ):
        body = await response.text()
    assert response.status == 200, f"GET {url}: {response.status} {body}"
    return body


# -- the text format ---------------------------------------------------------------------------


@dataclass
class Exposition:
    types: dict[str, str]  # family (as on its # TYPE line) -> type
    samples: dict[str, list[str]]  # family -> its sample lines


def parse(text: str) -> Exposition:
    types: dict[str, str] = {}
    samples: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            assert name not in types, f"two # TYPE lines for {name}"
            types[name] = kind
            samples[name] = []
        elif line and not line.startswith("#"):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            family = name
            if family not in types:
                for suffix in ("_bucket", "_sum", "_count"):
                    if name.endswith(suffix) and name.removesuffix(suffix) in types:
                        family = name.removesuffix(suffix)
            assert family in types, f"sample without a # TYPE line: {line}"
            samples[family].append(line)
    return Exposition(types, samples)


def promtool_check(text: str, what: str) -> None:
    """`promtool check metrics` on ``text``: exit 0 and nothing printed (lint problems)."""
    result = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT,
        check=False,
    )
    printed = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not printed, (
        f"promtool check metrics on {what}'s /metrics exited {result.returncode}:\n"
        f"{printed}\n--- the body ---\n{text}"
    )


def check_families(text: str, expected: dict[str, str], absent: dict[str, str], what: str) -> None:
    """The contract's families for ``what`` are there with their types and samples (of the
    test's service); the other daemon's are not."""
    exposition = parse(text)
    tidegate = {n: t for n, t in exposition.types.items() if n.startswith("tidegate_")}
    wrong = {
        name: (tidegate.get(name), kind)
        for name, kind in expected.items()
        if tidegate.get(name) != kind
    }
    assert not wrong, f"{what}: families missing or of the wrong type (found, wanted): {wrong}"
    assert not set(absent) & set(tidegate), f"{what} serves the other daemon's families"
    empty = [
        name
        for name in expected
        if not any(f'service="{SERVICE}"' in line for line in exposition.samples[name])
    ]
    assert not empty, f"{what}: families without samples of {SERVICE}: {empty}\n{text}"


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed (tests/setup.sh installs Debian's prometheus)")


# -- tidegate ----------------------------------------------------------------------------------


@dataclass
class Up:
    child: Child
    port: int
    metrics_port: int
    socket: Path

    def status(self) -> dict[str, Any]:
        result = run_cli("status", SERVICE, "--json", "--socket", str(self.socket))
        assert result.returncode == 0, result.stderr
        [service] = [s for s in json.loads(result.stdout)["services"] if s["name"] == SERVICE]
        assert isinstance(service, dict)
        return service


async def start_up(w: World) -> Up:
    """`tidegate up` for the service file on free ports (not awaited: see :func:`wait_ready`)."""
    port, metrics_port = free_port(), free_port()
    sock = w.sockets / "scaler.sock"
    child = await w.tidegate(
        "tidegate up",
        "up",
        str(w.service_file()),
        "--state-dir",
        str(w.dir / "state"),
        "--scaler-socket",
        str(sock),
        "--listen",
        f"127.0.0.1:{port}",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        metrics_port=metrics_port,
    )
    return Up(child, port, metrics_port, sock)


# Every status class the app gives, and an upstream error (502), so every family has samples.
SOME_TRAFFIC = ["/", "/", "/missing", "/boom", "/garbage", "/"]
SOME_STATUSES = [200, 200, 404, 500, 502, 200]


async def test_promtool_passes_on_tidegate_up(tmp_path: Path) -> None:
    require("promtool")
    async with world(tmp_path) as w:
        up = await start_up(w)
        await wait_ready(w, up.child)
        assert await traffic(up.port, SOME_TRAFFIC) == SOME_STATUSES, w.logs()

        text = await fetch(f"http://127.0.0.1:{up.metrics_port}/metrics")
        promtool_check(text, "tidegate up")
        # `up` serves both daemons' metrics on its one listener
        check_families(text, {**INGRESS_FAMILIES, **SCALER_FAMILIES}, {}, "tidegate up")


async def test_promtool_passes_on_ingress_and_scaler_apart(tmp_path: Path) -> None:
    require("promtool")
    async with world(tmp_path) as w:
        port, ingress_metrics, scaler_metrics = free_port(), free_port(), free_port()
        control = w.sockets / "ingress.sock"
        ingress = await w.tidegate(
            "tidegate ingress",
            "ingress",
            "--listen",
            f"127.0.0.1:{port}",
            "--metrics-listen",
            f"127.0.0.1:{ingress_metrics}",
            "--control-socket",
            str(control),
            metrics_port=ingress_metrics,
        )
        scaler = await w.tidegate(
            "tidegate scaler",
            "scaler",
            str(w.service_file()),
            "--ingress-socket",
            str(control),
            "--socket",
            str(w.sockets / "scaler.sock"),
            "--metrics-listen",
            f"127.0.0.1:{scaler_metrics}",
            "--state-dir",
            str(w.dir / "state"),
            metrics_port=scaler_metrics,
        )
        await wait_ready(w, ingress, scaler)
        assert await traffic(port, SOME_TRAFFIC) == SOME_STATUSES, w.logs()

        ingress_text = await fetch(f"http://127.0.0.1:{ingress_metrics}/metrics")
        scaler_text = await fetch(f"http://127.0.0.1:{scaler_metrics}/metrics")
        promtool_check(ingress_text, "tidegate ingress")
        promtool_check(scaler_text, "tidegate scaler")
        check_families(ingress_text, INGRESS_FAMILIES, SCALER_FAMILIES, "tidegate ingress")
        check_families(scaler_text, SCALER_FAMILIES, INGRESS_FAMILIES, "tidegate scaler")


# -- Prometheus --------------------------------------------------------------------------------

JOB = "tidegate"


def prometheus_config(metrics_port: int) -> str:
    return "\n".join(
        [
            "global:",
            "  scrape_interval: 1s",
            "  scrape_timeout: 1s",
            "  evaluation_interval: 1s",
            "scrape_configs:",
            f"  - job_name: {JOB}",
            "    static_configs:",
            f"      - targets: ['127.0.0.1:{metrics_port}']",
            "",
        ]
    )


async def start_prometheus(w: World, metrics_port: int) -> tuple[Child, str]:
    """Debian's prometheus scraping ``metrics_port``; the child and its base URL."""
    config = w.dir / "prometheus.yml"
    config.write_text(prometheus_config(metrics_port))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    child = await w.spawn(
        "prometheus",
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={w.dir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        f"{base}/-/ready",
    )
    return child, base


async def query(session: aiohttp.ClientSession, base: str, promql: str) -> dict[str, float]:
    """An instant query's vector, as {its labels (but __name__) as k=v joined by ',': value}."""
    async with session.get(f"{base}/api/v1/query", params={"query": promql}) as response:
        reply = await response.json()
    assert reply.get("status") == "success", f"{promql}: {reply}"
    assert reply["data"]["resultType"] == "vector", reply
    return {
        ",".join(f"{k}={v}" for k, v in sorted(r["metric"].items()) if k != "__name__"): float(
            r["value"][1]
        )
        for r in reply["data"]["result"]
    }


async def test_prometheus_scrapes_known_traffic(tmp_path: Path) -> None:
    require("prometheus")
    async with world(tmp_path) as w:
        up = await start_up(w)
        prometheus, base = await start_prometheus(w, up.metrics_port)
        await wait_ready(w, up.child, prometheus)

        paths = ["/"] * 20 + ["/missing"] * 5 + ["/boom"] * 3
        statuses = await traffic(up.port, paths)
        assert statuses == [200] * 20 + [404] * 5 + [500] * 3, w.logs()

        selector = f'service="{SERVICE}"'
        wanted_codes = {"code_class=2xx": 20.0, "code_class=4xx": 5.0, "code_class=5xx": 3.0}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CONVERGE_TIMEOUT
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while True:
                status = up.status()
                seen = {
                    "up": await query(session, base, f'up{{job="{JOB}"}}'),
                    "codes": {
                        k: v
                        for k, v in (
                            await query(
                                session,
                                base,
                                f"sum by (code_class) (tidegate_requests_total{{{selector}}})",
                            )
                        ).items()
                        if v != 0
                    },
                    "ready": await query(
                        session, base, f'tidegate_instances{{{selector},state="ready"}}'
                    ),
                    "desired": await query(
                        session, base, f"tidegate_desired_instances{{{selector}}}"
                    ),
                }
                target = f"instance=127.0.0.1:{up.metrics_port},job={JOB}"
                wanted = {
                    "up": {target: 1.0},
                    "codes": wanted_codes,
                    "ready": {f"{target},service={SERVICE},state=ready": float(status["ready"])},
                    "desired": {f"{target},service={SERVICE}": float(status["desired"])},
                }
                if seen == wanted and status["ready"] >= 1 and status["desired"] >= 1:
                    break
                if loop.time() > deadline:
                    pytest.fail(
                        f"Prometheus did not report the expected values within "
                        f"{CONVERGE_TIMEOUT} s\nseen:   {seen}\nwanted: {wanted}\n"
                        f"status: {status}\n{w.logs()}"
                    )
                await asyncio.sleep(0.2)

            # Prometheus's own idea of each family's type, from the metadata it scraped
            async with session.get(f"{base}/api/v1/metadata") as response:
                metadata = (await response.json())["data"]
        for name, kind in {**INGRESS_FAMILIES, **SCALER_FAMILIES}.items():
            family = name.removesuffix("_total") if kind == "counter" else name
            types = {m["type"] for m in metadata.get(name, metadata.get(family, []))}
            assert types == {kind}, f"Prometheus's metadata for {name}: {types}, wanted {kind}"
