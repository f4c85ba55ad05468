"""Test instances: small aiohttp apps the ingress proxies to, counting what they see.

Each app counts its own in-flight requests, so a test can prove the ingress never sent an
instance more than max_concurrency at once, measured where it matters: inside the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web
from aiohttp.typedefs import Handler


@dataclass
class Backend:
    name: str
    port: int = 0
    inflight: int = 0
    max_inflight: int = 0
    requests: int = 0
    bytes_sent: int = 0
    # request order across backends is recorded in a list the test may share between them
    order: list[tuple[str, str]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


BACKEND = web.AppKey("backend", Backend)


@web.middleware
async def _count(request: web.Request, handler: Handler) -> web.StreamResponse:
    backend: Backend = request.app[BACKEND]
    backend.requests += 1
    backend.inflight += 1
    backend.max_inflight = max(backend.max_inflight, backend.inflight)
    backend.order.append((backend.name, request.headers.get("x-index", "")))
    try:
        return await handler(request)
    finally:
        backend.inflight -= 1


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "backend": request.app[BACKEND].name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_length": len(body),
            "chunked": request.headers.get("Transfer-Encoding", "") == "chunked",
        }
    )


async def _slow(request: web.Request) -> web.Response:
    """Hold the request for ?ms=N milliseconds, or until the test sets backend.release."""
    backend: Backend = request.app[BACKEND]
    if "ms" in request.query:
        await asyncio.sleep(int(request.query["ms"]) / 1000)
    else:
        await backend.release.wait()
    return web.Response(text=f"slow from {backend.name}\n")


async def _stream(request: web.Request) -> web.StreamResponse:
    """Stream ?bytes=N bytes in 64 KiB writes, counting what the app managed to write."""
    backend: Backend = request.app[BACKEND]
    total = int(request.query["bytes"])
    response = web.StreamResponse()
    response.content_length = total
    await response.prepare(request)
    block = b"x" * 65536
    sent = 0
    while sent < total:
        piece = block[: min(len(block), total - sent)]
        await response.write(piece)
        sent += len(piece)
        backend.bytes_sent = sent
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    """Read the body in pieces without keeping it; answer with its length."""
    total = 0
    async for piece in request.content.iter_chunked(65536):
        total += len(piece)
    return web.Response(text=str(total))


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, body=None if code in (204, 304) else b"status body")


async def _ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT and message.data == "bye":
            await ws.close()  # the instance ends the tunnel
        elif message.type == WSMsgType.TEXT:
            await ws.send_str("echo:" + message.data)
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


def make_app(backend: Backend) -> web.Application:
    app = web.Application(middlewares=[_count], client_max_size=1024**3)
    app[BACKEND] = backend
    app.router.add_route("*", "/echo", _echo)
    app.router.add_route("*", "/echo/{tail:.*}", _echo)
    app.router.add_get("/slow", _slow)
    app.router.add_get("/stream", _stream)
    app.router.add_post("/upload", _upload)
    app.router.add_put("/upload", _upload)
    app.router.add_route("*", "/status/{code}", _status)
    app.router.add_get("/ws", _ws)
    return app


@contextlib.asynccontextmanager
async def running_backends(
    count: int, order: list[tuple[str, str]] | None = None
) -> AsyncIterator[list[Backend]]:
    """Start `count` backends on 127.0.0.1 port 0; stop them all on exit, also on failure."""
    shared = order if order is not None else []
    backends = [Backend(name=f"b{i}", order=shared) for i in range(count)]
    try:
        for backend in backends:
            runner = web.AppRunner(make_app(backend), access_log=None, shutdown_timeout=0.5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            backend.runner = runner
            backend.port = runner.addresses[0][1]
        yield backends
    finally:
        for backend in backends:
            backend.release.set()
            if backend.runner is not None:
                await backend.runner.cleanup()
