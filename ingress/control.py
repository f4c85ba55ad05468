"""The ingress's control API: how the scaler tells it where to route, and hears back.

Served with aiohttp on a unix socket (mode 0600, so only the ingress's user can reconfigure
it); the endpoints and message types are listed in :mod:`ingress.messages`. The router that
owns the routing table implements :class:`ControlTarget`; this module only translates HTTP to
calls on it and its pushed events to WebSocket frames.

Rules:

- Target methods are synchronous and are called on the event loop, like the proxy's.
- The event listener runs on the proxy's hot path: it never awaits and never blocks. It encodes
  an event once and appends the same bytes to every subscriber's bounded
  :class:`SubscriberQueue`. Stats supersede each other, so a slow subscriber loses stale
  snapshots; cold-start and drained events are never dropped, so a subscriber that lets
  ``max_pending`` of them pile up is closed (1013, try again later) and must resync.
- One timer for all subscribers: every ``stats_interval`` the snapshot is taken and encoded
  once, and the same frame goes to each.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Protocol, TypeVar

import aiohttp
import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from ingress.messages import (
    ErrorBody,
    Event,
    InstanceSpec,
    ServiceRouting,
    ServiceStats,
    StatsEvent,
    StatsSnapshot,
)
from ingress.unixsock import ControlSocketError, UnixListener

__all__ = [
    "ControlClient",
    "ControlError",
    "ControlServer",
    "ControlSocketError",
    "ControlTarget",
    "SubscriberQueue",
    "UnixJsonClient",
    "decode_body",
    "error_response",
    "json_errors",
    "serve_unix",
]

_log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Request bodies are routing tables: a few thousand instances at ~100 bytes each fit easily.
_MAX_BODY_BYTES = 4 * 1024 * 1024
# Seconds a closing subscription waits for the subscriber's close frame (aiohttp's default is
# 10 s; our subscribers are local processes that answer at once or not at all).
_WS_CLOSE_TIMEOUT = 2.0
# Seconds close() lets request handlers finish before cancelling them.
_SHUTDOWN_GRACE = 2.0
# RFC 6455 section 5.5: a close frame's reason fits in 123 bytes.
_OVERFLOW_REASON = "subscriber too slow: {n} cold-start/drained events pending; resubscribe"
_SHUTDOWN_REASON = "ingress control server closing"
_JSON = "application/json"


class ControlTarget(Protocol):
    """What the control API drives: the ingress's router, or a fake in tests."""

    def put_service(self, routing: ServiceRouting) -> ServiceStats:
        """Create or replace a service; ValueError if the routing is invalid (400)."""
        ...

    def put_instances(self, name: str, instances: list[InstanceSpec]) -> ServiceStats:
        """Replace a service's instances; KeyError if unknown (404), ValueError if invalid."""
        ...

    def delete_service(self, name: str) -> None:
        """Remove a service, answering its held requests with 503; KeyError if unknown."""
        ...

    def services(self) -> list[ServiceRouting]: ...

    def snapshot(self) -> StatsSnapshot: ...

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Call ``listener`` synchronously, on the loop, for each cold-start and drained event."""
        ...

    def remove_listener(self, listener: Callable[[Event], None]) -> None: ...


class SubscriberQueue:
    """Encoded frames waiting for one subscriber, bounded, oldest first.

    At most one stats frame is held: a newer one replaces it and moves to the back, since a
    snapshot makes the ones before it useless. Other events are kept, up to ``maxsize``; the
    one past that is refused and the subscriber must be closed. So the queue never holds more
    than ``maxsize + 1`` frames, and what it yields is always in the order pushed.
    """

    __slots__ = ("_events", "_maxsize", "_stats", "_stats_after")

    def __init__(self, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self._maxsize = maxsize
        self._events: collections.deque[bytes] = collections.deque()
        self._stats: bytes | None = None
        self._stats_after = 0  # events queued ahead of the held stats frame

    @property
    def maxsize(self) -> int:
        return self._maxsize

    def __len__(self) -> int:
        return len(self._events) + (self._stats is not None)

    def push_stats(self, frame: bytes) -> None:
        """Hold ``frame`` as the latest snapshot, dropping any older one not yet sent."""
        self._stats = frame
        self._stats_after = len(self._events)

    def push_event(self, frame: bytes) -> bool:
        """Queue an event that must not be lost; False if ``maxsize`` are already waiting."""
        if len(self._events) >= self._maxsize:
            return False
        self._events.append(frame)
        return True

    def pop(self) -> bytes | None:
        """The oldest frame, or None if the queue is empty."""
        if self._stats is not None and self._stats_after == 0:
            frame, self._stats = self._stats, None
            return frame
        if not self._events:
            return None
        if self._stats is not None:
            self._stats_after -= 1
        return self._events.popleft()

    def clear(self) -> None:
        self._events.clear()
        self._stats = None
        self._stats_after = 0


class _Subscription:
    """One WebSocket subscriber: its queue, the wake-up of its writer, and why it ends."""

    __slots__ = ("close_code", "close_reason", "queue", "wakeup")

    def __init__(self, max_pending: int) -> None:
        self.queue = SubscriberQueue(max_pending)
        self.wakeup = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""

    def push_stats(self, frame: bytes) -> None:
        self.queue.push_stats(frame)
        self.wakeup.set()

    def push_event(self, frame: bytes) -> bool:
        if not self.queue.push_event(frame):
            return False
        self.wakeup.set()
        return True

    def close(self, code: int, reason: str) -> None:
        """End the subscription: drop what is pending and let the writer send the close."""
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        self.queue.clear()
        self.wakeup.set()


def _json_response(body: bytes, status: int = 200) -> web.Response:
    return web.Response(status=status, body=body, content_type=_JSON)


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = msgspec.json.encode(ErrorBody(error=message))
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


def _unknown_service(name: str) -> web.Response:
    return error_response(404, f"unknown service {name!r}")


@web.middleware
async def json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give aiohttp's own errors (404, 405, 413, a bad upgrade) and crashes a JSON body too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(exc.status, exc.text or exc.reason, headers)
    except Exception as exc:
        _log.exception("control request %s %s failed", request.method, request.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


def decode_body(body: bytes, type_: type[_T]) -> _T | web.Response:
    """The decoded body, or a 400 carrying msgspec's message (it names the field path)."""
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        return error_response(400, str(exc))


async def serve_unix(
    app: web.Application, listener: UnixListener, shutdown_timeout: float
) -> web.AppRunner:
    """Serve ``app`` on ``listener``'s socket (ControlSocketError if a live process holds
    it); on any failure nothing is left behind: no runner, no socket file."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        # From the liveness probe to listen() nothing awaits, so no other coroutine of
        # ours can slip in between.
        sock = listener.bind()
        try:
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            listener.unlink()
            raise
    except BaseException:
        await runner.cleanup()
        raise
    return runner


class ControlServer:
    """Serves the control API for ``target`` on the unix socket at ``path``.

    ``stats_interval`` is in seconds (default 0.1, the period :class:`StatsEvent` promises);
    ``max_pending`` is how many cold-start/drained events a subscriber may fall behind by
    before it is closed (default 1024).
    """

    def __init__(
        self,
        target: ControlTarget,
        path: str | os.PathLike[str],
        *,
        stats_interval: float = 0.1,
        max_pending: int = 1024,
    ) -> None:
        if stats_interval <= 0:
            raise ValueError(f"stats_interval must be > 0 seconds, got {stats_interval}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._target = target
        self._path = os.fspath(path)
        self._stats_interval = stats_interval
        self._max_pending = max_pending
        self._encoder = msgspec.json.Encoder()
        self._subscribers: set[_Subscription] = set()
        self._runner: web.AppRunner | None = None
        self._listener = UnixListener(self._path)
        self._tick: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
        self._closing = False

    @property
    def path(self) -> str:
        return self._path

    async def start(self) -> None:
        """Listen on the socket; ControlSocketError if a live process already answers on it."""
        if self._runner is not None:
            raise RuntimeError("ControlServer.start() called twice")
        app = web.Application(middlewares=[json_errors], client_max_size=_MAX_BODY_BYTES)
        app.router.add_put("/v1/services/{name}", self._put_service)
        app.router.add_put("/v1/services/{name}/instances", self._put_instances)
        app.router.add_delete("/v1/services/{name}", self._delete_service)
        app.router.add_get("/v1/services", self._services)
        app.router.add_get("/v1/stats", self._stats)
        app.router.add_get("/v1/subscribe", self._subscribe)
        self._runner = await serve_unix(app, self._listener, _SHUTDOWN_GRACE)
        self._target.add_listener(self._on_event)
        loop = asyncio.get_running_loop()
        self._next_tick = loop.time() + self._stats_interval
        self._tick = loop.call_at(self._next_tick, self._on_tick)

    async def close(self) -> None:
        """Close every subscription, stop listening and remove the socket file."""
        if self._closing:
            return
        self._closing = True
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
        if self._runner is None:
            return
        self._target.remove_listener(self._on_event)
        for sub in self._subscribers:
            sub.close(WSCloseCode.GOING_AWAY, _SHUTDOWN_REASON)
        self._subscribers.clear()
        await self._runner.cleanup()  # waits _SHUTDOWN_GRACE for handlers, then cancels them
        self._runner = None
        self._listener.unlink()

    # -- HTTP endpoints --------------------------------------------------------------------

    async def _put_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        routing = decode_body(await request.read(), ServiceRouting)
        if isinstance(routing, web.Response):
            return routing
        if routing.name != name:
            return error_response(
                400, f"service name in the path ({name!r}) differs from $.name ({routing.name!r})"
            )
        try:
            stats = self._target.put_service(routing)
        except ValueError as exc:
            return error_response(400, str(exc))
        return _json_response(self._encoder.encode(stats))

    async def _put_instances(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        instances = decode_body(await request.read(), list[InstanceSpec])
        if isinstance(instances, web.Response):
            return instances
        try:
            stats = self._target.put_instances(name, instances)
        except KeyError:
            return _unknown_service(name)
        except ValueError as exc:
            return error_response(400, str(exc))
        return _json_response(self._encoder.encode(stats))

    async def _delete_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            self._target.delete_service(name)
        except KeyError:
            return _unknown_service(name)
        return web.Response(status=204)

    async def _services(self, request: web.Request) -> web.Response:
        return _json_response(self._encoder.encode(self._target.services()))

    async def _stats(self, request: web.Request) -> web.Response:
        return _json_response(self._encoder.encode(self._target.snapshot()))

    # -- subscriptions ---------------------------------------------------------------------

    def _encode_stats(self) -> bytes:
        return self._encoder.encode(StatsEvent(snapshot=self._target.snapshot()))

    def _on_tick(self) -> None:
        loop = asyncio.get_running_loop()
        # Fixed rate rather than "interval after the last one", so the gap stays within the
        # interval; after a stall, start again from now instead of firing a burst.
        self._next_tick += self._stats_interval
        if self._next_tick <= loop.time():
            self._next_tick = loop.time() + self._stats_interval
        self._tick = loop.call_at(self._next_tick, self._on_tick)
        if not self._subscribers:
            return
        try:
            frame = self._encode_stats()
        except Exception:
            _log.exception("taking the stats snapshot failed")
            return
        for sub in self._subscribers:
            sub.push_stats(frame)

    def _on_event(self, event: Event) -> None:
        """The listener given to the target: encode once, queue everywhere, never wait."""
        if not self._subscribers:
            return
        frame = self._encoder.encode(event)
        if isinstance(event, StatsEvent):
            for sub in self._subscribers:
                sub.push_stats(frame)
            return
        overflowed = [sub for sub in self._subscribers if not sub.push_event(frame)]
        for sub in overflowed:
            self._subscribers.discard(sub)
            reason = _OVERFLOW_REASON.format(n=sub.queue.maxsize)
            sub.close(WSCloseCode.TRY_AGAIN_LATER, reason)
            _log.warning("closing a control subscription: %s", reason)

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        if self._closing:
            return error_response(503, _SHUTDOWN_REASON)
        ws = web.WebSocketResponse(compress=False, timeout=_WS_CLOSE_TIMEOUT)
        if not ws.can_prepare(request):
            return error_response(400, "GET /v1/subscribe must be a WebSocket upgrade")
        sub = _Subscription(self._max_pending)
        # Subscribed, with a fresh snapshot first in line, before the 101 goes out: nothing
        # pushed after the client sees its subscription start can be missed.
        sub.push_stats(self._encode_stats())
        self._subscribers.add(sub)
        try:
            await ws.prepare(request)
            # The reader ends when the subscriber closes (closing `sub`), or when we close `ws`.
            reader = asyncio.create_task(_read_until_closed(ws, sub))
            try:
                await _write_frames(ws, sub)
            except ConnectionError:
                pass  # the subscriber went away mid-send; the reader sees the loss too
            except Exception:
                _log.exception("control subscription failed")
                sub.close(WSCloseCode.INTERNAL_ERROR, "internal error")
            except BaseException:  # cancelled at shutdown: aiohttp drops the connection
                reader.cancel()
                raise
            if sub.close_code is not None and not ws.closed:
                # Safe while the reader waits in receive(): aiohttp wakes it and takes over
                # reading the subscriber's close frame (bounded by _WS_CLOSE_TIMEOUT).
                await ws.close(code=sub.close_code, message=sub.close_reason.encode())
            reader.cancel()
        finally:
            self._subscribers.discard(sub)
        return ws


async def _write_frames(ws: web.WebSocketResponse, sub: _Subscription) -> None:
    """Send the subscription's frames as they come, until it is closed."""
    queue = sub.queue
    while True:
        frame = queue.pop()
        if frame is None:
            if sub.close_code is not None:
                return
            sub.wakeup.clear()
            await sub.wakeup.wait()
            continue
        # msgspec's JSON is UTF-8 already: send it as a text frame without a decode/encode.
        await ws.send_frame(frame, WSMsgType.TEXT)


async def _read_until_closed(ws: web.WebSocketResponse, sub: _Subscription) -> None:
    """Read (and ignore) what the subscriber sends, so its pings and close get answered."""
    try:
        async for _ in ws:
            pass
    finally:
        sub.close(WSCloseCode.OK, "")


# -- the client -----------------------------------------------------------------------------

_BASE_URL = "http://tidegate-ingress"  # the Host header; the socket decides where it goes
# Generous: a snapshot of thousands of instances is a few hundred kilobytes.
_MAX_EVENT_BYTES = 64 * 1024 * 1024


class ControlError(Exception):
    """A control call failed: ``status`` is the HTTP status, or 0 when there was no answer
    (the ingress is unreachable, the connection broke, or it ended a subscription)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"{self.status}: {self.message}" if self.status else self.message


class UnixJsonClient:
    """JSON over HTTP on a unix socket, errors as :class:`ControlError`: the base of the
    ingress's and the scaler's control clients.

    ``timeout`` bounds each request in seconds (default 10).
    """

    base_url = _BASE_URL  # the Host header; the socket decides where it goes

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        self._path = os.fspath(path)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ControlError(0, "the control client is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=self._path))
        return self._session

    async def _call(self, method: str, url: str, body: bytes | None = None) -> bytes:
        headers = {"Content-Type": _JSON} if body is not None else None
        try:
            async with self._get_session().request(
                method, self.base_url + url, data=body, headers=headers, timeout=self._timeout
            ) as resp:
                data = await resp.read()
                status, reason = resp.status, resp.reason or ""
        except aiohttp.ClientError as exc:
            raise ControlError(0, f"{method} {url} on {self._path} failed: {exc}") from exc
        except TimeoutError as exc:
            raise ControlError(0, f"{method} {url} on {self._path} timed out") from exc
        if status >= 400:
            raise ControlError(status, _error_message(data, reason))
        return data


class ControlClient(UnixJsonClient):
    """A client of the control API over its unix socket, for the scaler and tests.

    ``timeout`` bounds each request in seconds (default 10); it does not apply to the
    subscription, which lasts as long as the ingress keeps it open.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 10.0) -> None:
        super().__init__(path, timeout=timeout)
        self._event_decoder = msgspec.json.Decoder(Event)

    async def put_service(self, routing: ServiceRouting) -> ServiceStats:
        body = msgspec.json.encode(routing)
        data = await self._call("PUT", f"/v1/services/{_quote(routing.name)}", body)
        return msgspec.json.decode(data, type=ServiceStats)

    async def put_instances(self, name: str, instances: list[InstanceSpec]) -> ServiceStats:
        body = msgspec.json.encode(instances)
        data = await self._call("PUT", f"/v1/services/{_quote(name)}/instances", body)
        return msgspec.json.decode(data, type=ServiceStats)

    async def delete_service(self, name: str) -> None:
        await self._call("DELETE", f"/v1/services/{_quote(name)}")

    async def services(self) -> list[ServiceRouting]:
        return msgspec.json.decode(
            await self._call("GET", "/v1/services"), type=list[ServiceRouting]
        )

    async def stats(self) -> StatsSnapshot:
        return msgspec.json.decode(await self._call("GET", "/v1/stats"), type=StatsSnapshot)

    async def subscribe(self) -> AsyncGenerator[Event, None]:
        """Yield the ingress's events, a :class:`StatsEvent` first.

        Raises ControlError when the ingress ends the subscription (status 0, the close code
        and reason in the message); returns quietly once this client is closed.
        """
        try:
            ws = await self._get_session().ws_connect(
                _BASE_URL + "/v1/subscribe", max_msg_size=_MAX_EVENT_BYTES
            )
        except aiohttp.WSServerHandshakeError as exc:
            raise ControlError(exc.status, exc.message) from exc
        except aiohttp.ClientError as exc:
            raise ControlError(0, f"cannot subscribe on {self._path}: {exc}") from exc
        async with ws:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.TEXT:
                    yield self._event_decoder.decode(msg.data)
                elif self._closed:
                    return
                elif msg.type is WSMsgType.CLOSE:
                    raise ControlError(
                        0, f"the ingress ended the subscription ({msg.data}): {msg.extra}"
                    )
                elif msg.type is WSMsgType.ERROR:
                    raise ControlError(0, f"subscription failed: {msg.data}")
                elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                    raise ControlError(0, "the subscription's connection closed")


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _error_message(data: bytes, reason: str) -> str:
    try:
        return msgspec.json.decode(data, type=ErrorBody).error
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace").strip() or reason
