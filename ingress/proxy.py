"""One client connection of the ingress: read requests, route, hold or send, stream both ways.

A :class:`ClientConnection` is an ``asyncio.Protocol``; the HTTP work is done by the sans-IO
pieces it wires together: the :class:`~ingress.h1.request.RequestReader` calls it back with
request heads and body bytes, :mod:`ingress.h1.forward` builds the heads it sends, the
service's :class:`~ingress.balancer.ServiceBalancer` gives it a slot on an instance (or holds
it), and an :class:`~ingress.upstream.UpstreamConnection` calls it back with the response.

Rules this module keeps:

- **Exact accounting.** A slot taken on an instance (``acquire`` or a ``grant`` from the hold
  queue) is released exactly once, by :meth:`ClientConnection._release_slot`, on every path:
  response end, error, timeout, client gone. There is no ``await`` between taking a slot and
  handing it to an upstream connection, except the connect itself, whose task checks that its
  exchange is still current before using the connection.
- **One request at a time per connection.** Pipelined requests that arrive while one is in
  progress are kept as parsed events and reading is paused until the response is done, so
  responses go out in order and memory stays bounded by one read.
- **Back-pressure both ways.** The upstream's write buffer pauses reading from the client and
  the client's pauses reading from the upstream (asyncio's high-water marks, 64 KiB).
- **Cheap timers.** One deadline per connection (head, keep-alive idle or whole request) kept
  in the shared :class:`~ingress.timers.TimerWheel`.
"""

from __future__ import annotations

import asyncio
import collections
from time import monotonic_ns as _clock  # vDSO: no syscall
from typing import TYPE_CHECKING, Any, cast

from ingress.accesslog import line as log_line
from ingress.h1.forward import (
    BODY_CHUNKED,
    BODY_CLOSE,
    BODY_NONE,
    LAST_CHUNK,
    chunk,
    client_response,
    error_response,
    new_request_id,
    upstream_request,
)
from ingress.h1.request import RequestError, RequestHead, RequestReader

if TYPE_CHECKING:
    from ingress.accesslog import AccessLog
    from ingress.balancer import HeldRequest, Instance
    from ingress.h1.response import ResponseHead
    from ingress.router import Router, Service
    from ingress.timers import TimerWheel
    from ingress.upstream import UpstreamConnection, UpstreamPool

# Why reading from the client is paused; reading resumes when no reason is left.
_PAUSE_PIPELINE = 1  # a pipelined request waits for the current response
_PAUSE_BODY = 2  # body bytes buffered while no upstream connection is ready
_PAUSE_UPSTREAM = 4  # the upstream's write buffer is full
_PAUSE_UPGRADE = 8  # an upgrade request waits for the instance's answer

# Timings (queue wait, upstream time, durations) are integer nanoseconds of
# time.monotonic_ns, not the loop's clock: uvloop's loop.time() is libuv's millisecond tick,
# cached per iteration, too coarse for a proxy that adds well under a millisecond. Integers
# keep differences exact (the access log's microseconds are integer arithmetic in its line;
# Server-Timing's milliseconds are divided once). Deadlines stay on the loop's clock.
_NS_PER_MS = 1e6  # divided by, not multiplied with 1e-6: division rounds the result once
_S_PER_NS = 1e-9
# nginx's status for a request whose client left before any answer; only ever logged
_CLIENT_GONE = 499

# What the connection's single deadline means right now.
_DL_NONE = 0
_DL_IDLE = 1  # keep-alive: waiting for the next request
_DL_HEAD = 2  # part of a request head arrived (slowloris guard)
_DL_REQUEST = 3  # a request is in progress: request_timeout

# Body bytes buffered before an upstream connection is ready (then reading pauses).
_BODY_BUFFER_LIMIT = 65536

# RFC 9110 §9.2.2: these may be retried when nothing came back.
# Failures before any answer that say the instance itself is unwell (not the request): it is
# ejected for a moment (ingress.router.EJECT_SECONDS).
_EJECTING = frozenset({"connect", "reset"})
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ProxyContext:
    """What every client connection of one ingress shares."""

    __slots__ = (
        "access_log",
        "all_closed",
        "connections",
        "draining",
        "head_timeout",
        "keepalive_timeout",
        "loop",
        "max_head_bytes",
        "router",
        "wheel",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        router: Router,
        wheel: TimerWheel,
        *,
        keepalive_timeout: float,
        head_timeout: float,
        max_head_bytes: int,
        access_log: AccessLog | None = None,
    ) -> None:
        self.access_log = access_log
        self.loop = loop
        self.router = router
        self.wheel = wheel
        self.keepalive_timeout = keepalive_timeout
        self.head_timeout = head_timeout
        self.max_head_bytes = max_head_bytes
        self.draining = False
        self.connections: set[ClientConnection] = set()
        self.all_closed: asyncio.Event | None = None  # set by the last connection to close

    def forget(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self.all_closed is not None:
            self.all_closed.set()


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_body",
        "_body_buffered",
        "_body_size",
        "_bytes_out",
        "_client",
        "_client_ip",
        "_closed",
        "_ctx",
        "_deadline",
        "_deadline_kind",
        "_head",
        "_held",
        "_instance",
        "_instance_id",
        "_keep_alive",
        "_pause_mask",
        "_pending",
        "_reader",
        "_replaying",
        "_request_done",
        "_request_id",
        "_resp_mode",
        "_response_started",
        "_resume_reader",
        "_retried",
        "_scheme",
        "_sent_continue",
        "_seq",
        "_service",
        "_status",
        "_t0",
        "_t_grant",
        "_t_head",
        "_trace",
        "_transport",
        "_tunnel",
        "_tunnel_leftover",
        "_up_head",
        "_up_reusable",
        "_upstream",
        "_wbuf",
        "_write_paused",
        "wheel_slot",
    )

    def __init__(self, ctx: ProxyContext, scheme: bytes) -> None:
        self._ctx = ctx
        self._scheme = scheme
        self._transport: asyncio.Transport | None = None
        self._reader = RequestReader(self, max_head_bytes=ctx.max_head_bytes)
        self._client = ""  # the peer's address as text
        self._client_ip = b""
        self._closed = False
        self._pause_mask = 0
        self._write_paused = False
        self._wbuf: list[bytes] = []
        self._pending: collections.deque[tuple[int, Any]] | None = None
        self._replaying = False
        self._seq = 0
        self.wheel_slot = -1
        self._deadline_kind = _DL_NONE
        self._deadline = 0.0  # when the current deadline is due; the wheel may fire earlier
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self._head: RequestHead | None = None
        self._service: Service | None = None
        self._instance: Instance | None = None
        self._held: HeldRequest | None = None
        self._upstream: UpstreamConnection | None = None
        self._up_head = b""
        self._up_reusable = False
        self._request_id = b""
        self._body: list[bytes] | None = None
        self._body_buffered = 0
        self._body_size = 0
        self._request_done = False
        self._response_started = False
        self._resp_mode = BODY_NONE
        self._status = 0
        self._keep_alive = False
        self._retried = False
        self._sent_continue = False
        self._tunnel = False
        self._tunnel_leftover = b""
        self._resume_reader = False
        self._t0 = 0  # arrival (ns, _clock)
        self._t_grant = -1  # when an instance was given to the request (-1: never)
        self._t_head = -1  # when the instance's response head came (-1: never)
        self._bytes_out = 0  # response body bytes from the instance
        self._trace = b""
        self._instance_id: str | None = None  # for the access log, once the slot is gone

    # -- asyncio.Protocol: the client side -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client = str(peer[0])
            self._client_ip = self._client.encode()
        self._ctx.connections.add(self)
        if self._ctx.draining:
            transport.close()
            return
        self._set_deadline(_DL_IDLE, self._ctx.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            upstream = self._upstream
            if upstream is not None and upstream.transport is not None:
                upstream.transport.write(data)
            return
        try:
            leftover = self._reader.feed(data)
        except RequestError as exc:
            self._reject(exc.status, exc.reason)
            return
        if leftover is not None:
            # An upgrade request ended: what follows is tunnel data, if the instance agrees.
            self._tunnel_leftover = leftover
            self._pause(_PAUSE_UPGRADE)
        elif self._head is None and self._deadline_kind != _DL_HEAD and self._reader.in_message:
            self._set_deadline(_DL_HEAD, self._ctx.head_timeout)
        self.flush()

    def eof_received(self) -> bool | None:
        if self._tunnel:
            upstream = self._upstream
            if upstream is not None and upstream.transport is not None:
                if upstream.transport.can_write_eof():
                    upstream.transport.write_eof()
                return True
            return False
        # A client's FIN cannot be told apart from a hang-up, and browsers never half-close:
        # like nginx, take it as the client leaving, so a held request leaves the queue and an
        # instance stops working on an answer nobody will read.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wbuf.clear()
        self._ctx.wheel.cancel(self)
        self._ctx.forget(self)
        held = self._held
        if held is not None and self._service is not None:
            self._held = None
            self._service.balancer.cancel(held)
        upstream = self._upstream
        if upstream is not None:
            self._upstream = None
            if self._tunnel:
                upstream.close()  # a tunnel's end: what the client sent last still goes
            else:
                upstream.abort()  # nobody will read the answer: stop the instance's work
        if self._head is not None or self._status:
            self._end_unfinished()
        self._release_slot()
        self._head = None

    def pause_writing(self) -> None:
        self._write_paused = True
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        upstream = self._upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()

    # -- RequestSink -----------------------------------------------------------------------

    def on_request_head(self, head: RequestHead) -> None:
        if self._head is not None or self._pending:
            self._defer(0, head)
            return
        self._begin(head)

    def on_request_body(self, data: bytes) -> None:
        if self._pending:
            self._defer(1, data)
            return
        self._body_received(data)

    def on_request_end(self) -> None:
        if self._pending:
            self._defer(2, None)
            return
        self._request_end()

    # -- a request -------------------------------------------------------------------------

    def _begin(self, head: RequestHead) -> None:
        ctx = self._ctx
        self._seq += 1
        self._head = head
        self._t0 = _clock()
        now = ctx.loop.time()  # deadlines are on the loop's clock
        service = ctx.router.route(head.host)
        if service is None:
            self._respond_error(404, "no service for this host")
            return
        self._service = service
        self._set_deadline(_DL_REQUEST, service.request_timeout)
        limit = service.max_body
        if limit is not None and head.content_length is not None and head.content_length > limit:
            self._respond_error(413, f"request body over {limit} bytes")
            return
        self._up_head, self._request_id, self._trace = upstream_request(
            head,
            client_ip=self._client_ip,
            scheme=self._scheme,
            tunnel=head.upgrade is not None,
        )
        instance = service.balancer.acquire()
        if instance is not None:
            service.queue_wait.counts[0] += 1  # no wait: the lowest bucket, adds 0 to the sum
            self._t_grant = self._t0
            self._dispatch(instance)
            return
        held = service.hold(self, now)
        if held is None:
            self._respond_error(503, "queue full", retry_after=service.retry_after)
        elif self._instance is None:  # hold() may have granted a slot at once
            self._held = held

    def grant(self, instance: Instance) -> None:
        """The hold queue gave this request a slot on `instance` (Waiter protocol)."""
        self._held = None
        self._t_grant = now = _clock()
        if self._service is not None:
            self._service.queue_wait.observe((now - self._t0) * _S_PER_NS)
        if self._closed or self._service is None:
            # cannot happen while the queue cancels on connection_lost, but never leak a slot
            if self._service is not None:
                self._service.balancer.release(instance)
            return
        self._dispatch(instance)
        # granted from another connection's event (or a control-API call): nothing else
        # will flush what this one has to say (an interim 100 Continue)
        self.flush()

    def queue_expired(self) -> None:
        """Held past queue.timeout, or the service went away."""
        self._held = None
        service = self._service
        retry_after = service.retry_after if service is not None else 1
        self._respond_error(503, "no instance could take the request in time", retry_after)
        self.flush()

    def _dispatch(self, instance: Instance) -> None:
        service = self._service
        assert service is not None
        self._instance = instance
        self._instance_id = instance.id
        pool = service.pool_for(instance)
        conn = pool.take()
        if conn is not None:
            self._attach(conn)
        else:
            self._ctx.loop.create_task(self._connect(pool, instance, self._seq))

    async def _connect(self, pool: UpstreamPool, instance: Instance, seq: int) -> None:
        service = self._service
        assert service is not None
        try:
            async with asyncio.timeout(service.connect_timeout):
                _, conn = await self._ctx.loop.create_connection(pool.new, *pool.address)
        except (OSError, TimeoutError) as exc:
            if self._seq == seq and self._instance is instance:
                self._upstream_failed_early("connect", str(exc) or "connect timed out")
                self.flush()
            return
        if self._seq != seq or self._instance is not instance or self._closed:
            conn.release(True, self._ctx.loop.time())  # someone else may use it
            return
        self._attach(conn)
        self.flush()

    def _attach(self, conn: UpstreamConnection) -> None:
        head = self._head
        assert head is not None
        self._upstream = conn
        body = self._body
        if body:
            self._body = None
            data = b"".join([self._up_head, *body])
            self._body_buffered = 0
        else:
            data = self._up_head
        conn.send(self, data, head_request=head.method == b"HEAD")
        if self._pause_mask & _PAUSE_BODY:
            self._resume(_PAUSE_BODY)
        if self._write_paused and conn.transport is not None:
            conn.transport.pause_reading()
        if head.expect_continue and not self._request_done and not self._body_size:
            # We answer 100-continue ourselves once an instance has the request, so a held
            # request's client waits for us instead of sending a body that may not be wanted.
            self._sent_continue = True
            self._wbuf.append(_CONTINUE)

    def _body_received(self, data: bytes) -> None:
        head = self._head
        if head is None:
            return  # the exchange ended early (error response); the connection is closing
        self._body_size += len(data)
        service = self._service
        if service is None:
            return  # an error response was made; the connection closes after it
        limit = service.max_body
        if limit is not None and self._body_size > limit:
            if not self._response_started:
                self._abort_upstream()
                self._respond_error(413, f"request body over {limit} bytes")
            else:
                self._close()
            return
        if head.chunked:
            data = chunk(data)
        conn = self._upstream
        if conn is not None:
            assert conn.transport is not None
            conn.transport.write(data)
            return
        if self._held is None and self._instance is None:
            return  # the request was answered already (error): drop the rest
        body = self._body
        if body is None:
            body = self._body = []
        body.append(data)
        self._body_buffered += len(data)
        if self._body_buffered > _BODY_BUFFER_LIMIT:
            self._pause(_PAUSE_BODY)

    def _request_end(self) -> None:
        head = self._head
        if head is None:
            return
        self._request_done = True
        if not head.chunked or self._service is None:
            return
        conn = self._upstream
        if conn is not None and conn.transport is not None:
            conn.transport.write(LAST_CHUNK)
        elif self._held is not None or self._instance is not None:
            if self._body is None:
                self._body = []
            self._body.append(LAST_CHUNK)

    # -- UpstreamOwner: the instance's response --------------------------------------------

    def on_upstream_head(self, head: ResponseHead) -> None:
        request = self._head
        assert request is not None
        status = head.status
        if status < 200:
            if status == 101:
                if request.upgrade is None:
                    self._upstream_failed_early("bad_response", "101 without an upgrade request")
                    return
                data, _mode = client_response(
                    head,
                    request_id=self._request_id,
                    client_minor=request.http_minor,
                    keep_alive=True,
                    head_request=False,
                    tunnel=True,
                    server_timing=self._server_timing(),
                )
                self._response_started = True
                self._status = 101
                self._wbuf.append(data)
            elif request.http_minor == 1 and not (status == 100 and self._sent_continue):
                data, _mode = client_response(
                    head,
                    request_id=self._request_id,
                    client_minor=1,
                    keep_alive=True,
                    head_request=False,
                )
                self._wbuf.append(data)
            return
        if request.upgrade is not None:
            # declined: go on parsing what followed the upgrade request after this response
            self._resume_reader = True
        self._response_started = True
        self._status = status
        self._up_reusable = head.keep_alive
        keep_alive = request.keep_alive and self._request_done and not self._ctx.draining
        data, mode = client_response(
            head,
            request_id=self._request_id,
            client_minor=request.http_minor,
            keep_alive=keep_alive,
            head_request=request.method == b"HEAD",
            server_timing=self._server_timing(),
        )
        self._keep_alive = keep_alive and mode != BODY_CLOSE
        self._resp_mode = mode
        self._wbuf.append(data)

    def _server_timing(self) -> bytes:
        """Server-Timing for the response head being sent now: the queue wait and the
        instance's time to answer (from getting an instance, connect included), in ms."""
        self._t_head = now = _clock()
        granted = self._t_grant
        return b"queue;dur=%.1f, upstream;dur=%.1f" % (
            (granted - self._t0) / _NS_PER_MS,
            (now - granted) / _NS_PER_MS,
        )

    def on_upstream_body(self, data: bytes) -> None:
        self._bytes_out += len(data)
        mode = self._resp_mode
        if mode == BODY_CHUNKED:
            if data:
                self._wbuf.append(chunk(data))
        elif mode != BODY_NONE:
            self._wbuf.append(data)

    def on_upstream_end(self) -> None:
        if self._tunnel or self._status == 101:
            return  # a 101's "end" is the start of the tunnel
        if self._resp_mode == BODY_CHUNKED:
            self._wbuf.append(LAST_CHUNK)
        conn = self._upstream
        self._upstream = None
        if conn is not None:
            conn.release(self._up_reusable and self._request_done, self._ctx.loop.time())
        self._release_slot()
        self._finish()

    def on_upstream_upgraded(self, leftover: bytes) -> None:
        self._tunnel = True
        if leftover:
            self._wbuf.append(leftover)
        conn = self._upstream
        if self._tunnel_leftover and conn is not None and conn.transport is not None:
            conn.transport.write(self._tunnel_leftover)
        self._tunnel_leftover = b""
        # A tunnel lives as long as both ends want it; it stays counted as in flight.
        self._ctx.wheel.cancel(self)
        self._deadline_kind = _DL_NONE
        self._resume(_PAUSE_UPGRADE)

    def on_tunnel_data(self, data: bytes) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(data)

    def on_upstream_failed(self, conn: UpstreamConnection, kind: str, reason: str) -> None:
        if conn is not self._upstream:
            return
        self._upstream = None
        conn.abort()
        if self._tunnel:
            # the instance ended the tunnel: a normal end for a WebSocket, not an error
            self._release_slot()
            self._keep_alive = False
            self._finish()
            return
        if self._response_started:
            # Part of the response is out: the client can only learn of the failure by the
            # connection closing before the response's framing says it is complete.
            self._count_error(kind)
            self._release_slot()
            self.flush()
            self._close()
            return
        if (
            kind == "reset"
            and not conn.received
            and not self._retried
            and self._head is not None
            and self._head.method in _IDEMPOTENT
            and not self._head.chunked
            and not self._head.content_length
        ):
            # A kept-alive connection the instance had just closed, or an instance gone
            # between its last request and this one: nothing was processed, try once more.
            self._retry()
            return
        self._upstream_failed_early(kind, reason)

    def flush(self) -> None:
        buf = self._wbuf
        if not buf:
            return
        transport = self._transport
        if self._closed or transport is None:
            buf.clear()
            return
        if len(buf) == 1:
            transport.write(buf[0])
        else:
            transport.writelines(buf)
        buf.clear()

    def pause_client_reading(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_client_reading(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    # -- errors, retries, timeouts ---------------------------------------------------------

    def _upstream_failed_early(self, kind: str, reason: str) -> None:
        """The instance failed before any response byte reached the client."""
        if kind in _EJECTING:
            self._eject()
        if kind == "connect" and not self._retried:
            self._retry()  # nothing was sent: any request may go elsewhere
            return
        self._count_error(kind)
        self._release_slot()
        status = 504 if kind == "timeout" else 502
        self._respond_error(status, f"instance {kind}: {reason}")

    def _eject(self) -> None:
        """This request's instance refused or reset it: out of the rotation for a moment,
        so neither the retry nor new requests go to an instance that is likely gone."""
        service, instance = self._service, self._instance
        if service is not None and instance is not None:
            service.eject(instance, self._ctx.loop.time())

    def _retry(self) -> None:
        """Once per request: give the request to another instance if there is one."""
        self._retried = True
        self._eject()
        service = self._service
        failed = self._instance
        assert service is not None and failed is not None
        self._instance = None
        balancer = service.balancer
        # acquire while the failed one still counts this request, so an equal peer wins
        other = balancer.acquire()
        if other is not None:
            balancer.release(failed)
            self._dispatch(other)
            return
        held = service.hold(self, self._ctx.loop.time())
        balancer.release(failed)  # may grant the slot straight back to us
        if held is None:
            self._respond_error(503, "queue full", retry_after=service.retry_after)
        elif self._instance is None:
            self._held = held

    def _count_error(self, kind: str) -> None:
        service = self._service
        if service is not None:
            errors = service.errors
            errors[kind] = errors.get(kind, 0) + 1

    def on_deadline(self, now: float) -> None:
        if now < self._deadline:
            # the deadline moved later since the wheel entry was made (see _set_deadline)
            self._ctx.wheel.schedule(self, self._deadline)
            return
        kind = self._deadline_kind
        self._deadline_kind = _DL_NONE
        if kind == _DL_IDLE:
            self._close()
        elif kind == _DL_HEAD:
            self._reject(408, "request head not received in time")
        elif kind == _DL_REQUEST:
            if self._response_started or self._tunnel:
                self._count_error("timeout")
                self._abort_upstream()
                self._release_slot()
                self._close()
            else:
                self._abort_upstream()
                self._upstream_failed_early("timeout", "no response within request_timeout")
                self.flush()

    def _reject(self, status: int, reason: str) -> None:
        """Malformed input from the client: answer if we still can, then close."""
        if self._head is not None and self._response_started:
            self._abort_upstream()
            self._release_slot()
            self._close()
            return
        self._abort_upstream()
        self._release_slot()
        self._cancel_held()
        # the id the client sees is the one its log line carries (connection_lost logs it)
        request_id = self._request_id = self._request_id or new_request_id()
        self._wbuf.append(error_response(status, request_id, reason, close=True))
        self._keep_alive = False
        self._status = status
        self._count_end(_clock())
        self.flush()
        self._close()

    def _respond_error(self, status: int, message: str, retry_after: int | None = None) -> None:
        """A response the ingress makes itself; ends the exchange."""
        head = self._head
        assert head is not None
        self._cancel_held()
        self._abort_upstream()
        self._release_slot()
        # keep the connection only if the request was read to its end (else its body would
        # be taken for the next request)
        keep_alive = (
            head.keep_alive
            and head.http_minor == 1  # our error heads do not say keep-alive to 1.0 clients
            and (self._request_done or (not head.chunked and not head.content_length))
            and not self._ctx.draining
        )
        self._keep_alive = keep_alive
        self._status = status
        self._response_started = True
        # how long it waited for an instance (until now if it never got one)
        waited = (self._t_grant if self._t_grant >= 0 else _clock()) - self._t0
        if not self._request_id:  # never forwarded: the id is made here, and logged
            self._request_id = new_request_id()
        self._wbuf.append(
            error_response(
                status,
                self._request_id,
                message,
                close=not keep_alive,
                retry_after=retry_after,
                head_request=head.method == b"HEAD",
                server_timing=b"queue;dur=%.1f" % (waited / _NS_PER_MS),
            )
        )
        if keep_alive:
            # no body to wait for: the request is complete as far as framing goes
            self._request_done = True
        self._finish()

    def _count_end(self, now: int) -> None:
        """A response went out whole (made here or by an instance): by service, or unrouted."""
        if self._service is not None:
            self._count_response(now)
        elif self._status:
            self._ctx.router.unrouted[self._status // 100] += 1

    def _count_response(self, now: int) -> None:
        service = self._service
        assert service is not None
        service.codes[self._status // 100] += 1
        service.duration.observe((now - self._t0) * _S_PER_NS)

    def _end_unfinished(self) -> None:
        """The connection closed with an exchange in progress: count and log it all the same.
        What the client saw: the response's status if one was started or made (a tunnel's
        101, a reject's 4xx), else 499 as nginx logs it, the client gone before an answer
        (given up in the queue during a cold start, say) -- the line operators look for."""
        now = _clock()
        if self._tunnel and self._service is not None:
            self._count_response(now)
        log = self._ctx.access_log
        if log is not None:
            if not self._status:
                self._status = _CLIENT_GONE  # the exchange is over: only the line reads it
            self._log_access(log, now)

    def _log_access(self, log: AccessLog, now: int) -> None:
        head = self._head
        service = self._service
        method: bytes | None
        path: bytes | None
        host: bytes | None
        if head is not None:
            t0 = self._t0
            method = head.method
            path = head.target
            host = head.host or None
        else:  # no head: logged as given up on now
            t0 = now
            method = path = host = None
        log.record(
            log_line(
                log.offset,
                t0,
                self._t_grant,
                self._t_head,
                now,
                self._request_id,
                self._trace or None,
                self._client,
                method,
                path,
                host,
                service.name if service is not None else None,
                self._instance_id,
                self._status,
                self._body_size,
                self._bytes_out,
            )
        )

    def _cancel_held(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if self._service is not None:
                self._service.balancer.cancel(held)

    def _abort_upstream(self) -> None:
        conn = self._upstream
        if conn is not None:
            self._upstream = None
            conn.abort()

    def _release_slot(self) -> None:
        instance = self._instance
        if instance is not None:
            self._instance = None
            assert self._service is not None
            self._service.balancer.release(instance)

    # -- end of an exchange ----------------------------------------------------------------

    def _finish(self) -> None:
        now = _clock()  # the exchange's end, for its duration and its log line alike
        # The response's last bytes go out first, the bookkeeping after: the client (and
        # whatever runs on the other cores) gets on with it while this core counts and logs.
        self.flush()
        self._count_end(now)
        log = self._ctx.access_log
        if log is not None:
            self._log_access(log, now)
        keep_alive = self._keep_alive and not self._ctx.draining
        resume_reader = self._resume_reader
        if not self._request_done:
            keep_alive = False
        self._reset_exchange()
        if not keep_alive:
            self._close()
            return
        self._set_deadline(_DL_IDLE, self._ctx.keepalive_timeout)
        if resume_reader:
            self._resume(_PAUSE_UPGRADE)
            try:
                leftover = self._reader.resume()
            except RequestError as exc:
                self._reject(exc.status, exc.reason)
                return
            if leftover is not None:  # the bytes held another upgrade request
                self._tunnel_leftover = leftover
                self._pause(_PAUSE_UPGRADE)
        if self._pending:
            self._replay()
        elif self._pause_mask & _PAUSE_PIPELINE:
            self._resume(_PAUSE_PIPELINE)

    def _defer(self, kind: int, payload: Any) -> None:
        pending = self._pending
        if pending is None:
            pending = self._pending = collections.deque()
        pending.append((kind, payload))
        self._pause(_PAUSE_PIPELINE)

    def _replay(self) -> None:
        if self._replaying:
            return  # the outer loop goes on
        pending = self._pending
        assert pending is not None
        self._replaying = True
        try:
            while pending and not self._closed:
                kind, payload = pending[0]
                if kind == 0 and self._head is not None:
                    return  # the next request waits for this one's response
                pending.popleft()
                if kind == 0:
                    self._begin(payload)
                elif kind == 1:
                    self._body_received(payload)
                else:
                    self._request_end()
        finally:
            self._replaying = False
        if not pending and self._pause_mask & _PAUSE_PIPELINE:
            self._resume(_PAUSE_PIPELINE)

    def _close(self) -> None:
        if not self._closed and self._transport is not None:
            self.flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.abort()

    def close_if_idle(self) -> bool:
        """Used when the ingress drains: close now if no request is in progress."""
        if self._head is None and not self._reader.in_message:
            self._close()
            return True
        return False

    # -- flow control and the deadline -----------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._pause_mask and self._transport is not None and not self._closed:
            self._transport.pause_reading()
        self._pause_mask |= reason

    def _resume(self, reason: int) -> None:
        mask = self._pause_mask
        if not mask & reason:
            return
        self._pause_mask = mask = mask & ~reason
        if not mask and self._transport is not None and not self._closed:
            self._transport.resume_reading()

    def _set_deadline(self, kind: int, timeout: float) -> None:
        """Make `kind` the connection's deadline, `timeout` from now.

        A later deadline leaves the wheel entry where it is: when it fires, on_deadline sees
        the deadline has moved and re-files it. So a keep-alive connection moving between its
        idle and request deadlines touches the wheel about once per timeout, not per request.
        """
        ctx = self._ctx
        deadline = ctx.loop.time() + timeout
        self._deadline_kind = kind
        self._deadline = deadline
        if self.wheel_slot < 0 or deadline < ctx.wheel.due(self):
            ctx.wheel.schedule(self, deadline)
