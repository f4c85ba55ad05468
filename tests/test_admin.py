"""Tests of the metrics listener over a real socket on port 0."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import prometheus_client
import pytest

from ingress.admin import AdminServer


class Flag:
    """A readiness flag the test flips."""

    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> bool:
        return self.value


@pytest.fixture
def registry() -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter(
        "tidegate_test_events", "Events seen by the test.", ["kind"], registry=registry
    )
    counter.labels(kind="cold").inc(3)
    return registry


@pytest.fixture
async def admin(registry: prometheus_client.CollectorRegistry) -> AsyncIterator[AdminServer]:
    server = AdminServer("127.0.0.1", 0, ready=Flag(), registry=registry)
    await server.start()
    yield server
    await server.close()


async def get(server: AdminServer, path: str) -> tuple[int, str, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{server.port}{path}") as resp,
    ):
        return resp.status, resp.headers["Content-Type"], await resp.text()


async def test_healthy(admin: AdminServer) -> None:
    """/-/healthy answers 200 "ok" even before the process is ready."""
    status, _, text = await get(admin, "/-/healthy")
    assert (status, text.strip()) == (200, "ok")


async def test_ready_follows_the_callable(registry: prometheus_client.CollectorRegistry) -> None:
    """/-/ready is 503 "not ready" until ready() turns true, then 200 "ready", and back."""
    flag = Flag()
    server = AdminServer("127.0.0.1", 0, ready=flag, registry=registry)
    await server.start()
    try:
        assert (await get(server, "/-/ready"))[::2] == (503, "not ready\n")
        flag.value = True
        assert (await get(server, "/-/ready"))[::2] == (200, "ready\n")
        flag.value = False
        assert (await get(server, "/-/ready"))[0] == 503
    finally:
        await server.close()


async def test_metrics_exposes_the_registry(admin: AdminServer) -> None:
    """/metrics serves the registry's samples in the Prometheus text format."""
    status, content_type, text = await get(admin, "/metrics")
    assert status == 200
    assert content_type == prometheus_client.CONTENT_TYPE_LATEST
    assert "# TYPE tidegate_test_events_total counter" in text
    assert 'tidegate_test_events_total{kind="cold"} 3.0' in text


async def test_unknown_path_is_404(admin: AdminServer) -> None:
    """Paths other than the three routes are 404."""
    assert (await get(admin, "/nothing"))[0] == 404


async def test_port_and_close(registry: prometheus_client.CollectorRegistry) -> None:
    """port is unknown before start(), the bound one after, and close() stops listening."""
    server = AdminServer("127.0.0.1", 0, ready=Flag(), registry=registry)
    with pytest.raises(RuntimeError):
        _ = server.port
    await server.start()
    port = server.port
    assert port > 0
    await server.close()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(server, "/-/healthy")
    assert server.port == port
