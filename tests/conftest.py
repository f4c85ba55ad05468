"""Shared fixtures: an in-process ingress on port 0, and raw HTTP helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvloop

from ingress.messages import InstanceSpec, ServiceRouting
from ingress.server import Ingress, IngressSettings

# A machine as bench.report describes it, for the report tests of every benchmark.
BENCH_MACHINE: dict[str, Any] = {
    "cpu_model": "Some CPU",
    "nproc": 2,
    "cpu_count": 2,
    "kernel": "6.1",
    "versions": {
        "docker_engine": "27.0",
        "docker_sdk": "7.1.0",
        "python": "3.11.9",
        "tidegate_commit": "abc1234",
    },
}


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Tests marked both_loops run on the default loop and on uvloop; the rest on uvloop,
    the loop the ingress runs on in production."""
    if item.get_closest_marker("both_loops") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@contextlib.asynccontextmanager
async def running_ingress(
    routings: list[ServiceRouting], **settings: Any
) -> AsyncIterator[Ingress]:
    """An ingress listening on 127.0.0.1:0 with these services; closed on exit, also on failure."""
    settings.setdefault("listen", ["127.0.0.1:0"])
    settings.setdefault("metrics_listen", None)
    ingress = Ingress(IngressSettings(**settings))
    try:
        await ingress.start()
        for routing in routings:
            ingress.router.put_service(routing)
        yield ingress
    finally:
        await ingress.close()


def routing(name: str = "svc", addresses: list[str] | None = None, **fields: Any) -> ServiceRouting:
    fields.setdefault("default", True)
    instances = [InstanceSpec(id=f"{name}-{i}", address=a) for i, a in enumerate(addresses or [])]
    return ServiceRouting(name=name, instances=instances, **fields)


def url(ingress: Ingress, path: str = "/") -> str:
    host, port = ingress.http_addresses[0]
    return f"http://{host}:{port}{path}"


async def raw_exchange(
    ingress: Ingress, data: bytes, *, until_close: bool = True, timeout: float = 5.0
) -> bytes:
    """Send raw bytes, read until the ingress closes (or `timeout`), return what came back."""
    host, port = ingress.http_addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        chunks = []
        async with asyncio.timeout(timeout):
            while True:
                piece = await reader.read(65536)
                if not piece:
                    break
                chunks.append(piece)
                if not until_close:
                    break
        return b"".join(chunks)
    finally:
        writer.close()


async def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll a cheap in-process condition with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
