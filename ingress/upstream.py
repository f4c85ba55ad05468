"""Connections from the ingress to instances, and a pool of idle ones per instance.

An :class:`UpstreamConnection` carries one request at a time for its current owner (a client
connection, see :mod:`ingress.proxy`) and parses the instance's response with the strict
:class:`~ingress.h1.response.ResponseReader`. Between requests it waits in its instance's
:class:`UpstreamPool`: last in, first out, so the warmest connections are reused and the
coldest age out; bytes arriving on an idle connection mean it can no longer be trusted, and
it is closed.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from ingress.h1.response import ResponseError, ResponseHead, ResponseReader


class UpstreamOwner(Protocol):
    """What a client connection does with its instance's response (ingress.proxy)."""

    def on_upstream_head(self, head: ResponseHead) -> None: ...
    def on_upstream_body(self, data: bytes) -> None: ...
    def on_upstream_end(self) -> None: ...
    def on_upstream_upgraded(self, leftover: bytes) -> None: ...
    def on_tunnel_data(self, data: bytes) -> None: ...
    def on_upstream_failed(self, conn: UpstreamConnection, kind: str, reason: str) -> None: ...
    def flush(self) -> None: ...
    def pause_client_reading(self) -> None: ...
    def resume_client_reading(self) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "_deferred_start",
        "_feeding",
        "_pool",
        "idle_since",
        "owner",
        "reader",
        "received",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.owner: UpstreamOwner | None = None
        self.reader = ResponseReader(self)
        self.received = False  # any byte of the current response arrived
        self.tunnel = False
        self.idle_since = 0.0
        # send() may be called from inside our own feed (a response's end hands this
        # connection to the next request at once); the reader is restarted after feed returns
        self._feeding = False
        self._deferred_start: bool | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Nothing was asked: a stray byte means the connection is out of step.
            self.close()
            return
        if self.tunnel:
            owner.on_tunnel_data(data)
            return
        self.received = True
        self._feeding = True
        try:
            leftover = self.reader.feed(data)
        except ResponseError as exc:
            self._feeding = False
            owner.on_upstream_failed(self, "bad_response", exc.reason)
            return
        self._feeding = False
        if self._deferred_start is not None:
            self.reader.start(head_request=self._deferred_start)
            self._deferred_start = None
        if leftover is not None:
            self.tunnel = True
            owner.on_upstream_upgraded(leftover)
        # one write to the client for everything this read produced (if the response ended,
        # this connection may already serve another owner, which flushes its own writes)
        owner.flush()

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None and not self.tunnel:
            try:
                self.reader.feed_eof()  # ends a close-delimited body
            except ResponseError as exc:
                owner.on_upstream_failed(self, "reset", exc.reason)
                return False
            owner.flush()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._pool.discard(self)
        owner = self.owner
        self.owner = None
        self.transport = None
        if owner is not None:
            if self.tunnel:
                owner.on_upstream_failed(self, "tunnel_closed", "instance closed the tunnel")
            else:
                reason = str(exc) if exc else "instance closed the connection"
                owner.on_upstream_failed(self, "reset", reason)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_client_reading()

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_client_reading()

    # -- ResponseSink: straight through to the owner ------------------------------------

    def on_response_head(self, head: ResponseHead) -> None:
        assert self.owner is not None
        self.owner.on_upstream_head(head)

    def on_response_body(self, data: bytes) -> None:
        assert self.owner is not None
        self.owner.on_upstream_body(data)

    def on_response_end(self) -> None:
        assert self.owner is not None
        self.owner.on_upstream_end()

    # -- used by the owner ---------------------------------------------------------------

    def send(self, owner: UpstreamOwner, data: bytes, *, head_request: bool) -> None:
        """Start a request for `owner`: the head (and any body bytes already at hand)."""
        self.owner = owner
        self.received = False
        if self._feeding:
            self._deferred_start = head_request
        else:
            self.reader.start(head_request=head_request)
        assert self.transport is not None
        self.transport.write(data)

    def release(self, reusable: bool, now: float) -> None:
        """The owner is done with it: back to the pool, or closed."""
        self.owner = None
        if reusable and not self.tunnel and self.transport is not None:
            self.idle_since = now
            self._pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Idle keep-alive connections to one instance, newest last."""

    __slots__ = ("_idle", "address", "closed", "max_idle")

    def __init__(self, address: tuple[str, int], *, max_idle: int) -> None:
        self.address = address
        self.max_idle = max_idle
        self._idle: list[UpstreamConnection] = []
        self.closed = False

    def take(self) -> UpstreamConnection | None:
        idle = self._idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                return conn
        return None

    def new(self) -> UpstreamConnection:
        return UpstreamConnection(self)

    def put(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self._idle) >= self.max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        # O(idle) only when a connection dies, which is rare next to reuse
        if conn in self._idle:
            self._idle.remove(conn)

    def expire(self, older_than: float) -> None:
        """Close connections idle since before `older_than` (the oldest are first)."""
        idle = self._idle
        count = 0
        while count < len(idle) and idle[count].idle_since < older_than:
            count += 1
        if count:
            stale, self._idle = idle[:count], idle[count:]
            for conn in stale:
                conn.close()

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        self.closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
