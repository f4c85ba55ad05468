"""The ingress daemon: listeners, the control API, the metrics listener, and shutdown.

:class:`Ingress` wires the pieces together and owns their lifecycle. Shutdown (SIGTERM or
SIGINT) follows what systemd and load balancers expect: stop accepting, close idle keep-alive
connections, let in-flight requests finish (their responses say ``Connection: close``) within
``drain_timeout``, then close what is left and exit 0. Under systemd, :func:`serve` also
takes socket-activated listeners and reports readiness, status, watchdog pings and stopping
(:mod:`ingress.systemd`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from ingress.accesslog import AccessLog
from ingress.admin import AdminServer, Route
from ingress.control import ControlServer
from ingress.messages import ServiceRouting, parse_address
from ingress.metrics import IngressCollector
from ingress.proxy import ClientConnection, ProxyContext
from ingress.router import Router
from ingress.routestore import RouteStore
from ingress.systemd import Notifier, Ticker, activated_listeners, start_watchdog
from ingress.timers import TimerWheel

log = logging.getLogger("tidegate.ingress")


class IngressSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The ingress's own settings (not a service's). Durations in seconds, sizes in bytes."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:8080"])  # host:port
    tls_listen: list[str] = []  # HTTPS listeners
    tls_certs: list[tuple[str, str]] = []  # (cert file, key file) pairs, chosen by SNI
    tls_self_signed: bool = False  # a local CA and leaf kept under tls_state_dir
    tls_state_dir: str | None = None
    tls_hostnames: list[str] = msgspec.field(default_factory=lambda: ["localhost"])
    metrics_listen: str | None = "127.0.0.1:9464"  # /metrics, /-/healthy, /-/ready
    control_socket: str | None = None  # unix socket of the control API (None: not served)
    routes_file: str | None = None  # the routing table kept here across restarts (None: not)
    keepalive_timeout: float = 60.0  # idle client connection (nginx: 75 s)
    head_timeout: float = 30.0  # a started request head must complete (nginx: 60 s)
    drain_timeout: float = 30.0  # on shutdown, for in-flight requests to finish
    max_head_bytes: int = 65536  # request head limit: 431 past it
    upstream_idle_timeout: float = 4.0  # below common app servers' keep-alive (5 s)
    max_idle_per_instance: int = 128  # idle upstream connections kept per instance
    access_log: str | None = None  # JSON lines per request to this file ("-": stdout)


def split_listen(address: str) -> tuple[str, int]:
    """host:port for a listener; ":8080" means every interface."""
    if address.startswith(":"):
        address = "0.0.0.0" + address
    return parse_address(address, allow_port_zero=True)


class Ingress:
    def __init__(self, settings: IngressSettings) -> None:
        self.settings = settings
        self._loop = asyncio.get_running_loop()
        self.wheel = TimerWheel(self._loop)
        self.router = Router(
            self.wheel, self._loop.time, max_idle_per_instance=settings.max_idle_per_instance
        )
        self.access_log = AccessLog(settings.access_log) if settings.access_log else None
        self.context = ProxyContext(
            self._loop,
            self.router,
            self.wheel,
            keepalive_timeout=settings.keepalive_timeout,
            head_timeout=settings.head_timeout,
            max_head_bytes=settings.max_head_bytes,
            access_log=self.access_log,
        )
        self.registry = CollectorRegistry()
        self.registry.register(IngressCollector(self.router, self.access_log))
        self._servers: list[asyncio.Server] = []
        self.http_addresses: list[tuple[str, int]] = []
        self.https_addresses: list[tuple[str, int]] = []
        self.admin: AdminServer | None = None
        self.control: ControlServer | None = None
        self._ready = False
        self._housekeeping: asyncio.TimerHandle | None = None
        self._tls_front: ssl.SSLContext | None = None  # the listeners' context, for reloads
        self._routes: RouteStore | None = None

    def ready(self) -> bool:
        return self._ready

    async def start(
        self,
        *,
        sockets: list[socket.socket] | None = None,
        tls_sockets: list[socket.socket] | None = None,
        mark_ready: bool = True,
        admin_routes: Sequence[Route] = (),
    ) -> None:
        """Listen (binding unless sockets are handed in), then serve the control API.

        `mark_ready=False` leaves /-/ready at 503 until set_ready(): for a caller that loads
        its services through the control API after this returns (`tidegate up`).
        `admin_routes` are extra GET routes for the metrics listener (`tidegate up` serves
        the scaler's status page at ``/``); the ingress alone has none.
        """
        settings = self.settings
        loop = self._loop
        tls_context = self._tls_context()
        if self.access_log is not None:
            self.access_log.start()  # an unwritable path fails here, before serving
            # logrotate moves the file away, then signals: reopen at the same path
            loop.add_signal_handler(signal.SIGUSR1, self.access_log.reopen)
        if settings.metrics_listen:
            host, port = split_listen(settings.metrics_listen)
            self.admin = AdminServer(
                host, port, ready=self.ready, registry=self.registry, routes=admin_routes
            )
            await self.admin.start()
        if sockets is None:
            sockets = [_bind(*split_listen(a)) for a in settings.listen]
        if tls_sockets is None:
            tls_sockets = [_bind(*split_listen(a)) for a in settings.tls_listen]
        ctx = self.context
        for sock in sockets:
            server = await loop.create_server(
                lambda: ClientConnection(ctx, b"http"), sock=sock, backlog=1024
            )
            self._servers.append(server)
            self.http_addresses.append(sock.getsockname()[:2])
        if tls_sockets and tls_context is None:
            raise ValueError("--tls-listen needs --tls-cert/--tls-key or --tls-self-signed")
        for sock in tls_sockets:
            server = await loop.create_server(
                lambda: ClientConnection(ctx, b"https"),
                sock=sock,
                backlog=1024,
                ssl=tls_context,
                ssl_handshake_timeout=10.0,
            )
            self._servers.append(server)
            self.https_addresses.append(sock.getsockname()[:2])
        if settings.routes_file:
            # before the control socket opens: the scaler's first put must win over these
            self._routes = RouteStore(settings.routes_file)
            for routing in self._routes.load():
                try:
                    self.router.put_service(routing)
                except ValueError as exc:
                    log.warning("skipping saved route %s: %s", routing.name, exc)
            restored = len(self.router.all_services())
            if restored:
                log.info("restored %d service(s) from %s", restored, settings.routes_file)
            self.router.on_change = self._routes.save_soon
        if settings.control_socket:
            self.control = ControlServer(self.router, settings.control_socket)
            await self.control.start()
        self._schedule_housekeeping()
        self._ready = mark_ready

    def set_ready(self) -> None:
        """/-/ready answers 200 from now on: the configuration is loaded."""
        self._ready = True

    def listening_text(self) -> str:
        """Where it listens, for systemd's STATUS line: ``http://127.0.0.1:8080, ...``."""
        urls = [
            f"{scheme}://{_url_host(host)}:{port}"
            for scheme, addresses in (
                ("http", self.http_addresses),
                ("https", self.https_addresses),
            )
            for host, port in addresses
        ]
        return ", ".join(urls) or "no listener"

    def status_text(self) -> str:
        """One line of what it is doing, for systemd's STATUS (cheap: a pass over services)."""
        if self.context.draining:
            return f"draining {len(self.context.connections)} connection(s)"
        services = self.router.all_services()
        ready = inflight = queued = 0
        for service in services:
            balancer = service.balancer
            ready += balancer.ready_count
            inflight += balancer.inflight
            queued += balancer.queued
        return (
            f"serving {len(services)} service(s), {ready} ready instance(s), "
            f"{inflight} request(s) in flight, {queued} queued"
        )

    def reload_tls(self) -> bool:
        """Read the certificate files again (after a renewal), for new handshakes; False when
        there are none to read. A bad file raises TLSConfigError and changes nothing.

        The listeners keep their context object; it takes the new default pair and the new
        SNI table, so a reload needs no new listener and drops no connection."""
        from ingress import tls

        front = self._tls_front
        pairs = self.settings.tls_certs
        if front is None or not pairs:
            return False
        fresh = tls.server_context(pairs)  # checks every pair before anything changes
        front.load_cert_chain(*pairs[0])
        front.sni_callback = fresh.sni_callback
        return True

    def _tls_context(self) -> ssl.SSLContext | None:
        from ingress import tls

        settings = self.settings
        if settings.tls_certs:
            self._tls_front = tls.server_context(settings.tls_certs)
            return self._tls_front
        if settings.tls_self_signed:
            state = (
                Path(settings.tls_state_dir) if settings.tls_state_dir else tls.default_state_dir()
            )
            return tls.self_signed_context(state, settings.tls_hostnames)
        return None

    def put_static(self, routing: ServiceRouting) -> None:
        self.router.put_service(routing)

    def _schedule_housekeeping(self) -> None:
        self._housekeeping = self._loop.call_later(1.0, self._housekeep)

    def _housekeep(self) -> None:
        """Once a second: close upstream connections idle past upstream_idle_timeout."""
        older_than = self._loop.time() - self.settings.upstream_idle_timeout
        for service in self.router.all_services():
            for pool in service.pools.values():
                pool.expire(older_than)
        self._schedule_housekeeping()

    async def drain(self, on_draining: Callable[[int], object] | None = None) -> None:
        """Stop accepting, finish in-flight requests within drain_timeout, close the rest.

        `on_draining` is called once accepting has stopped and idle connections are closed,
        with the number of connections left to finish (for systemd's STOPPING=1).
        """
        self._ready = False
        ctx = self.context
        ctx.draining = True
        for server in self._servers:
            server.close()
        busy = sum(not conn.close_if_idle() for conn in list(ctx.connections))
        if on_draining is not None:
            on_draining(busy)
        if ctx.connections:
            # each connection closes itself after its response; the last one sets the event
            ctx.all_closed = asyncio.Event()
            try:
                async with asyncio.timeout(self.settings.drain_timeout):
                    await ctx.all_closed.wait()
            except TimeoutError:
                pass
        left = len(ctx.connections)
        if left:
            log.warning("drain timeout: closing %d connection(s) with requests in flight", left)
            for conn in list(ctx.connections):
                conn.abort()
        await self.close()

    async def close(self) -> None:
        self._ready = False
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        for server in self._servers:
            server.close()
        for conn in list(self.context.connections):
            conn.abort()
        if self.control is not None:
            await self.control.close()
            self.control = None
        if self._routes is not None:
            self.router.on_change = None  # closing empties the table: that is not news
            self._routes.flush()
        self.router.close()
        self.wheel.close()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        if self.access_log is not None:
            self._loop.remove_signal_handler(signal.SIGUSR1)
            await self.access_log.close()
            self.access_log = None
            self.context.access_log = None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


STATUS_INTERVAL = 5.0  # seconds between systemd STATUS updates


async def serve(settings: IngressSettings, routings: list[ServiceRouting]) -> int:
    """Run until SIGTERM/SIGINT, then drain. Returns the exit status.

    Under systemd (see :mod:`ingress.systemd`): listens on the sockets socket activation
    passed instead of binding its own, sends READY=1 once listening with `routings` loaded,
    a STATUS line every STATUS_INTERVAL seconds, watchdog pings from this loop, and
    STOPPING=1 when it starts draining.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier.from_environ()
    watchdog = start_watchdog(loop, notifier)
    status: Ticker | None = None
    try:
        ingress = Ingress(settings)
        try:
            await start_activated(ingress)
        except BaseException:
            await ingress.close()
            raise
        for routing in routings:
            ingress.router.put_service(routing)
        print_addresses(ingress, "tidegate ingress")
        # Everything made so far (modules, settings, listeners) lives as long as the process:
        # move it out of the collector's sight so the collections that per-request garbage
        # triggers do not rescan it each time.
        gc.freeze()
        log.info("ready (pid %d)", os.getpid())
        if notifier.enabled:
            services = len(ingress.router.all_services())
            notifier.ready(f"serving {services} service(s) on {ingress.listening_text()}")
            status = Ticker(loop, STATUS_INTERVAL, lambda: notifier.status(ingress.status_text()))

        def reload() -> None:
            # SIGHUP: the certificates (renewed in place); every other setting is read at
            # start, and the routes come from the scaler
            notifier.send("RELOADING=1\nSTATUS=reloading the certificates")
            try:
                if ingress.reload_tls():
                    log.info("reloaded the TLS certificates")
                else:
                    log.info("SIGHUP: no certificate files to reload")
            except ValueError as exc:  # TLSConfigError: keep serving the old ones
                log.error("reloading the TLS certificates failed, keeping the old: %s", exc)
            notifier.send("READY=1\nSTATUS=" + ingress.status_text())

        loop.add_signal_handler(signal.SIGHUP, reload)
        await stop.wait()
        loop.remove_signal_handler(signal.SIGHUP)
        log.info("draining")
        await ingress.drain(
            on_draining=lambda busy: notifier.stopping(f"draining {busy} connection(s)")
        )
        return 0
    finally:
        for ticker in (watchdog, status):
            if ticker is not None:
                ticker.cancel()
        notifier.close()


async def start_activated(
    ingress: Ingress, *, mark_ready: bool = True, admin_routes: Sequence[Route] = ()
) -> None:
    """:meth:`Ingress.start` on the sockets systemd passed (socket activation: fds named
    ``https`` serve TLS, the others plain HTTP), or on its own when none were passed."""
    activated = activated_listeners()
    if activated is None:
        await ingress.start(mark_ready=mark_ready, admin_routes=admin_routes)
        return
    settings = ingress.settings
    if activated.https and not (settings.tls_certs or settings.tls_self_signed):
        raise ValueError(
            "systemd passed a socket named 'https': it needs --tls-cert/--tls-key "
            "or --tls-self-signed"
        )
    log.info(
        "socket activation: %d http and %d https listener(s) from systemd "
        "(--listen and --tls-listen are not used)",
        len(activated.http),
        len(activated.https),
    )
    await ingress.start(
        sockets=activated.http,
        tls_sockets=activated.https,
        mark_ready=mark_ready,
        admin_routes=admin_routes,
    )


def print_addresses(ingress: Ingress, prog: str) -> None:
    """Tell the user where to point a browser: the ports actually bound (port 0 included)."""
    for scheme, addresses in (("http", ingress.http_addresses), ("https", ingress.https_addresses)):
        for host, port in addresses:
            print(f"{prog}: listening on {scheme}://{_url_host(host)}:{port}", flush=True)
    metrics = ingress.settings.metrics_listen
    if ingress.admin is not None and metrics:
        host, _ = split_listen(metrics)
        url = f"http://{_url_host(host)}:{ingress.admin.port}/metrics"
        print(f"{prog}: metrics on {url}", flush=True)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
