"""The metrics listener: Prometheus exposition plus liveness and readiness for scripts.

Served with aiohttp on its own host:port (``--metrics-listen``), apart from the proxy's
listeners. Routes:

- ``GET /-/healthy`` -> 200 ``ok`` for as long as the process serves it;
- ``GET /-/ready``   -> 200 ``ready`` once ``ready()`` says so, 503 ``not ready`` before;
- ``GET /metrics``   -> the registry in the Prometheus text format;
- any extra ``routes`` the owner hands in (GET path -> aiohttp handler). The listener knows
  nothing of what they serve: the scaler adds its status page at ``/`` this way, and the
  ingress alone adds none (its ``/`` stays 404).

The exposition is generated on the event loop, not in a thread: collectors such as the
ingress's read loop-owned state (in-flight counts, queues) that is only consistent when read
from the loop's thread, and a registry of a few thousand series renders in about a
millisecond, less than the hop to an executor and back would cost.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import prometheus_client
from aiohttp import web

__all__ = ["AdminServer", "Handler", "Route"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Route = tuple[str, Handler]  # a GET path and what answers it

# Seconds close() lets in-flight requests (a scrape) finish before cancelling them.
_SHUTDOWN_GRACE = 2.0


class AdminServer:
    """Serves ``/metrics``, ``/-/healthy``, ``/-/ready`` and ``routes`` on ``host:port``.

    ``port`` 0 picks a free port, read back from :attr:`port` after :meth:`start`. Give
    ``host`` as an address: a name resolving to several addresses would get one free port
    each, and :attr:`port` reports the first.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ready: Callable[[], bool],
        registry: prometheus_client.CollectorRegistry,
        routes: Sequence[Route] = (),
    ) -> None:
        self._host = host
        self._requested_port = port
        self._ready = ready
        self._registry = registry
        self._routes = list(routes)
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port; RuntimeError before :meth:`start`."""
        if self._port is None:
            raise RuntimeError("AdminServer.port is known only after start()")
        return self._port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("AdminServer.start() called twice")
        app = web.Application()
        app.router.add_get("/-/healthy", self._healthy)
        app.router.add_get("/-/ready", self._ready_route)
        app.router.add_get("/metrics", self._metrics)
        for path, handler in self._routes:
            app.router.add_get(path, handler)
        # No access log: a scrape every few seconds would drown the log.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _ready_route(self, request: web.Request) -> web.Response:
        if self._ready():
            return web.Response(text="ready\n")
        return web.Response(status=503, text="not ready\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(self._registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )
