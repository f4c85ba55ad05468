"""The scaler's status page: render() on its own, served by the metrics listener, and in use.

render() is pure, so most of the page is checked on hand-made reports; then the handler on an
in-process :class:`ingress.admin.AdminServer` (headers, extra routes beside the built-in
ones), then for real: ``/`` on `tidegate up`'s metrics listener, and still 404 on the
ingress alone.
"""

from __future__ import annotations

import asyncio
import html
import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import prometheus_client
import pytest

from ingress.admin import AdminServer
from scaler.messages import (
    ColdStart,
    FileError,
    InstanceStatus,
    ScaleEvent,
    ServiceStatus,
    StatusReport,
)
from scaler.statuspage import REFRESH_SECONDS, handler, render, routes, utc_text
from tests.procs import (
    REPO,
    TIDEGATE,
    IngressProcess,
    free_port,
    ingress_process,
    stop,
    wait_ready,
)
from tests.test_commands import tidegate_up

NOW = "2026-11-26 12:00:00 UTC"


def service(**fields: Any) -> ServiceStatus:
    """A running service with two instances, one of them of the previous revision."""
    values: dict[str, Any] = {
        "name": "hello",
        "state": "running",
        "runtime": "process",
        "revision": "0123456789ab",
        "domains": ["hello.example.com"],
        "min_size": 0,
        "max_size": 3,
        "max_concurrency": 2,
        "desired": 2,
        "ready": 2,
        "starting": 1,
        "draining": 1,
        "inflight": 3,
        "queued": 4,
        "requests_per_second": 12.5,
        "p99_seconds": 0.0421,
        "reason": "panic: demand 5.0 over 2 instances",
        "start_failures": 0,
        "backoff_seconds": 0.0,
        "retry_in": 0.0,
        "last_error": None,
        "last_cold_start_seconds": 1.234,
        "scale_events": {"up": 7, "down": 5},
        "active_instance_seconds": 30.0,
        "idle_instance_seconds": 90.0,
        "instances": [
            InstanceStatus(
                id="hello-aaaa",
                state="ready",
                address="127.0.0.1:40001",
                inflight=2,
                current=True,
                age_seconds=192.0,
            ),
            InstanceStatus(
                id="hello-bbbb",
                state="draining",
                address=None,
                inflight=1,
                current=False,
                age_seconds=7300.0,
            ),
        ],
    }
    values.update(fields)
    return ServiceStatus(**values)


def text_of(page: str) -> str:
    """The page without tags and with entities decoded, whitespace squeezed: what one reads."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_render_shows_services_instances_and_their_numbers() -> None:
    """Every figure of `tidegate status` is on the page, per service and per instance."""
    page = render(StatusReport(services=[service()]), NOW)
    text = text_of(page)
    assert page.startswith("<!DOCTYPE html>")
    assert f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' in page
    assert NOW in text
    # the overview row: state, desired ready starting draining in-flight queued req/s p99,
    # last cold start, scale events up / down
    assert "hello running 2 2 1 1 3 4 12.5 42 ms 1.23 s 7 / 5" in text
    # the service's detail
    for expected in (
        "revision 0123456789ab",
        "routes hello.example.com",
        "size min 0, max 3, 2 requests per instance",
        "desired 2: 2 ready, 1 starting, 1 draining",
        "why panic: demand 5.0 over 2 instances",
        "load 3 in flight, 4 queued, 12.5 req/s",
        "last cold start 1.23 s",
        "scale events 7 / 5 (up / down)",
        "instance-seconds 30 active, 90 idle",
        # instances: id, state, address, in flight, revision, age
        "hello-aaaa ready 127.0.0.1:40001 2 current 3m 12s",
        "hello-bbbb draining - 1 previous (being replaced) 2h 01m",
    ):
        assert expected in text, expected
    assert "last error" not in text
    assert "Files not loaded" not in text


def test_render_shows_errors_back_off_and_files_not_loaded() -> None:
    """A failing service's last error and back-off, and each file not loaded, are shown."""
    failing = service(
        state="failing",
        last_error="instance exited with 3",
        start_failures=2,
        retry_in=4.0,
        instances=[],
        domains=[],
    )
    report = StatusReport(
        services=[failing], errors=[FileError("/srv/bad.yaml", "bad.yaml: port: must be > 0")]
    )
    text = text_of(render(report, NOW))
    assert "last error instance exited with 3" in text
    assert "back-off 2 failed start(s) in a row; next start in 4.0 s" in text
    assert "routes the default route" in text
    assert "No instances." in text
    assert "Files not loaded file error /srv/bad.yaml bad.yaml: port: must be > 0" in text


def test_render_without_services() -> None:
    """An empty scaler says so instead of drawing an empty table."""
    assert "No services." in text_of(render(StatusReport(services=[]), NOW))


def test_render_escapes_everything_from_the_report() -> None:
    """Free text (reasons, errors, addresses, file names, the time) cannot inject markup."""
    evil = '<script>alert("x")</script>'
    report = StatusReport(
        services=[
            service(
                name="a&b",
                state="running",
                reason=evil,
                last_error="<img src=x onerror=alert(1)>",
                domains=['"><b>d</b>'],
                instances=[
                    InstanceStatus(
                        id="<i>",
                        state="ready",
                        address="'><u>",
                        inflight=0,
                        current=True,
                        age_seconds=1.0,
                    )
                ],
            )
        ],
        errors=[FileError("<f>.yaml", "</table><h1>owned</h1>")],
    )
    page = render(report, "<now>")
    for raw in ("<script", "<img", "<b>d", "<i>", "<u>", "<f>", "</table><h1>", "<now>", "a&b"):
        assert raw not in page, raw
    for escaped in (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;",
        "&lt;img src=x onerror=alert(1)&gt;",
        "&quot;&gt;&lt;b&gt;d&lt;/b&gt;",
        "&#x27;&gt;&lt;u&gt;",
        'id="service-a&amp;b"',
        "&lt;/table&gt;&lt;h1&gt;owned&lt;/h1&gt;",
    ):
        assert escaped in page, escaped
    # what one reads is the original text
    assert evil in text_of(page)


def test_render_lists_recent_history_when_the_status_has_it() -> None:
    """Recent scale events and cold starts are listed when there are some; none leaves the
    sections out."""
    richer = msgspec.structs.replace(
        service(),
        recent_scale_events=[
            ScaleEvent(
                ago_seconds=5.0, direction="up", from_desired=1, to_desired=2, reason="<panic>"
            ),
            ScaleEvent(
                ago_seconds=75.0, direction="down", from_desired=2, to_desired=1, reason="idle"
            ),
        ],
        recent_cold_starts=[ColdStart(ago_seconds=3700.0, seconds=0.8)],
    )
    page = render(StatusReport(services=[richer]), NOW)
    text = text_of(page)
    assert "Recent scale events when direction desired why" in text
    assert "5s ago up 1 → 2 <panic>" in text
    assert "1m 15s ago down 2 → 1 idle" in text
    assert "Recent cold starts when took 1h 01m ago 800 ms" in text
    assert "&lt;panic&gt;" in page

    plain = text_of(render(StatusReport(services=[service()]), NOW))
    assert "Recent scale events" not in plain
    assert "Recent cold starts" not in plain


def test_utc_text() -> None:
    """The page's time is UTC, to the second."""
    assert utc_text(1795694400.9) == "2026-11-26 12:00:00 UTC"


# -- served ---------------------------------------------------------------------------------


@pytest.fixture
async def admin() -> AsyncIterator[AdminServer]:
    """A metrics listener with the status page of a fixed report, at a fixed time."""
    report = StatusReport(services=[service()])
    page = handler(lambda: report, clock=lambda: 1795694400.0)
    server = AdminServer(
        "127.0.0.1",
        0,
        ready=lambda: True,
        registry=prometheus_client.CollectorRegistry(),
        routes=[("/", page)],
    )
    await server.start()
    yield server
    await server.close()


async def test_handler_serves_the_page_uncached(admin: AdminServer) -> None:
    """GET / is 200 text/html in UTF-8, never cached, and loads nothing from elsewhere."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin.port}/") as response,
    ):
        body = await response.text()
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert "2026-11-26 12:00:00 UTC" in body
    assert "hello-aaaa" in body


async def test_extra_routes_leave_the_built_in_ones(admin: AdminServer) -> None:
    """With the page added, /metrics and /-/ready still answer and other paths are 404."""
    async with aiohttp.ClientSession() as session:
        for path, status in (("/-/ready", 200), ("/metrics", 200), ("/nothing", 404)):
            async with session.get(f"http://127.0.0.1:{admin.port}{path}") as response:
                assert response.status == status, path


def test_routes_put_the_page_at_the_root() -> None:
    """routes() is what the daemons hand their metrics listener: one GET route at /."""
    [(path, _)] = routes(lambda: StatusReport(services=[]))
    assert path == "/"


@pytest.mark.slow
async def test_tidegate_up_serves_the_page_on_its_metrics_listener(tmp_path: Path) -> None:
    """`tidegate up`'s one metrics listener serves the status page at / with its service."""
    async with tidegate_up(tmp_path) as up:
        await up.get()  # an instance, so the page lists one
        async with (
            aiohttp.ClientSession() as session,
            session.get(up.child.metrics_url("/")) as response,
        ):
            body = await response.text()
            assert response.status == 200, body
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert response.headers["Cache-Control"] == "no-store"
        text = text_of(body)
        assert "hello running" in text
        assert "hello-" in text and "127.0.0.1:" in text
        async with (
            aiohttp.ClientSession() as session,
            session.get(up.child.metrics_url("/metrics")) as response,
        ):
            assert response.status == 200
            assert "tidegate_desired_instances" in await response.text()


@pytest.mark.slow
async def test_ingress_alone_has_no_page(tmp_path: Path) -> None:
    """`tidegate ingress` knows nothing of the scaler: / on its metrics listener stays 404."""
    async with (
        ingress_process(tmp_path, "--static-upstream", "127.0.0.1:9") as child,
        aiohttp.ClientSession() as session,
        session.get(child.metrics_url("/")) as response,
    ):
        assert response.status == 404


@pytest.mark.slow
async def test_tidegate_scaler_serves_the_page(tmp_path: Path) -> None:
    """The scaler daemon alone serves the page at / on its own metrics listener."""
    control = tmp_path / "ingress.sock"
    async with ingress_process(tmp_path, "--control-socket", str(control)):
        metrics_port = free_port()
        log = tmp_path / "scaler.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                *TIDEGATE,
                "scaler",
                "--ingress-socket",
                str(control),
                "--socket",
                str(tmp_path / "scaler.sock"),
                "--metrics-listen",
                f"127.0.0.1:{metrics_port}",
                "--state-dir",
                str(tmp_path / "state"),
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
        scaler = IngressProcess(process, 0, metrics_port, log)
        try:
            await wait_ready(scaler)
            async with (
                aiohttp.ClientSession() as session,
                session.get(scaler.metrics_url("/")) as response,
            ):
                body = await response.text()
            assert response.status == 200, body
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "No services." in text_of(body)
        finally:
            assert await stop(process) == 0, scaler.output()
