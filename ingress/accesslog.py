"""The access log: one JSON line per request, written in batches off the request path.

The proxy appends one tuple of raw values per finished request (:meth:`AccessLog.record`):
no formatting, no clock read, no syscall. Once ``batch_size`` records wait, they are
formatted into JSON lines on the loop, after the callbacks at hand (a slice of 64 costs the
loop about 0.15 ms); the lines are handed to one writer thread every ``flush_interval`` or
64 KiB, and it writes each block with one ``write``. Formatting stays on the loop because it
needs the interpreter either way, and on a busy core two threads handing it back and forth
cost more than the formatting itself. A slow destination (a full pipe, a stalled disk)
never blocks the loop: blocks wait in a bounded queue, and past ``max_pending`` blocks new
records are dropped and counted (:attr:`dropped`), because a proxy that stops serving to keep
its log complete is worse than a gap in the log.

Times: the proxy's timestamps are ``time.monotonic()``; they are turned into wall-clock time
with one offset read per batch, so a line's ``time`` is the request's arrival.

``reopen()`` (SIGUSR1) makes the writer close and reopen the file before its next write, so
logrotate can move the file away and signal; standard output is never reopened.

Record fields, in order: ``time`` (RFC 3339 UTC, ms), ``request_id``, ``trace_id``,
``client``, ``method``, ``path``, ``host``, ``service``, ``instance``, ``status``,
``bytes_in`` (request body), ``bytes_out`` (response body), ``queue_ms``, ``upstream_ms``
(instance chosen to response head; null when no instance answered), ``total_ms``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time

import msgspec

__all__ = ["AccessLog", "format_batch"]

_log = logging.getLogger(__name__)

# (arrived, request_id, trace_id, client, method, path, host, service, instance, status,
#  bytes_in, bytes_out, queue_s, upstream_s or -1.0, total_s); arrived is time.monotonic()
Raw = tuple[
    float, bytes, bytes, bytes, bytes, bytes, bytes, str, str, int, int, int, float, float, float
]


_SLICE = 64  # records formatted at a time on the loop (about 0.15 ms of its time)
_HAND_BYTES = 64 * 1024  # formatted bytes handed to the writer at once (else at the interval)

_encode = msgspec.json.Encoder().encode

# One line, built with bytes formatting rather than a Struct per record: the writer thread
# shares the interpreter with the event loop, so what it spends per record comes off the
# proxy's throughput. Client-controlled text (ids, path, host) goes through the JSON encoder;
# the rest is numbers, names we made, and tokens the parser already checked.
_LINE = (
    b'{"time":"%s","request_id":%s,"trace_id":%s,"client":"%s","method":"%s","path":%s,'
    b'"host":%s,"service":%s,"instance":%s,"status":%d,"bytes_in":%d,"bytes_out":%d,'
    b'"queue_ms":%.3f,"upstream_ms":%s,"total_ms":%.3f}\n'
)


# bytes that stand for themselves inside a JSON string: printable ASCII but " and \
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def _text(value: bytes) -> bytes:
    """A JSON string of header bytes as they came (latin-1: never a decode error); most are
    plain ASCII and need no escaping, checked with one C call."""
    if not value.translate(None, _PLAIN):
        return b'"%s"' % value
    return _encode(value.decode("latin-1"))


class _Clock:
    """RFC 3339 times with milliseconds; the date and time of day are formatted once per
    second, since a batch's records mostly share it."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = b""

    def text(self, seconds: float) -> bytes:
        whole = int(seconds)
        if whole != self._second:
            self._second = whole
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)).encode()
        return b"%s.%03dZ" % (self._prefix, int((seconds - whole) * 1000))


def _names(cache: dict[object, bytes], value: str | bytes) -> bytes:
    """A host, service or instance name as JSON (null when empty), from ``cache``: a batch
    names few of them, many times."""
    text = cache.get(value)
    if text is None:
        if not value:
            text = b"null"
        elif isinstance(value, bytes):
            text = _text(value)
        else:
            text = _encode(value)
        cache[value] = text
    return text


def format_batch(batch: list[Raw], wall_offset: float) -> bytes:
    """JSON lines for ``batch``; ``wall_offset`` turns the monotonic clock into epoch seconds."""
    clock = _Clock()
    null = b"null"
    cache: dict[object, bytes] = {}
    return b"".join(
        [
            _LINE
            % (
                clock.text(arrived + wall_offset),
                _text(rid),
                b'"%s"' % trace if trace else null,  # 32 hex digits (forward.py checks)
                client,
                method,
                _text(path),
                _names(cache, host),
                _names(cache, service),
                _names(cache, instance),
                status,
                bytes_in,
                bytes_out,
                queue_s * 1000,
                b"%.3f" % (upstream_s * 1000) if upstream_s >= 0 else null,
                total_s * 1000,
            )
            for (
                arrived,
                rid,
                trace,
                client,
                method,
                path,
                host,
                service,
                instance,
                status,
                bytes_in,
                bytes_out,
                queue_s,
                upstream_s,
                total_s,
            ) in batch
        ]
    )


class AccessLog:
    """Collects records on the loop, formats them there in slices, and writes them from a
    thread to ``path`` ("-": stdout)."""

    def __init__(
        self,
        path: str,
        *,
        flush_interval: float = 0.1,
        batch_size: int = _SLICE,
        max_pending: int = 256,
    ) -> None:
        self.path = path
        self.dropped = 0  # records not written because the writer fell behind
        self.written = 0  # records handed to the writer
        self._flush_interval = flush_interval
        self._batch_size = batch_size
        self._max_pending = max_pending
        self._batch: list[Raw] = []
        self._chunks: list[bytes] = []  # formatted, not handed over yet
        self._chunk_bytes = 0
        self._chunk_records = 0
        self._formatting = False  # a _format() is scheduled
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        # blocks handed over (on the loop) and written (by the thread): one writer each, so
        # no lock; their difference is what waits
        self._handed = 0
        self._done = 0
        self._reopen = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd = -1

    def start(self) -> None:
        """Open the destination (errors surface here, before serving) and start the writer."""
        self._loop = asyncio.get_running_loop()
        self._fd = self._open()
        self._thread = threading.Thread(target=self._write_loop, name="access-log", daemon=True)
        self._thread.start()

    def record(self, raw: Raw) -> None:
        """One finished request (hot path: an append; formatting is scheduled per slice)."""
        batch = self._batch
        batch.append(raw)
        loop = self._loop
        if loop is None:
            return
        if len(batch) >= self._batch_size:
            if not self._formatting:
                # after the current callbacks: the response being finished goes out first
                self._formatting = True
                loop.call_soon(self._format)
        elif self._timer is None:
            self._timer = loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Format what waits and hand everything to the writer now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._format()
        self._hand()

    def reopen(self) -> None:
        """Reopen the file before the next write (after logrotate moved it)."""
        self._reopen.set()

    async def close(self) -> None:
        """Write what is waiting, then stop the writer."""
        self.flush()
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        if self._fd > 2:
            os.close(self._fd)
        self._fd = -1

    def _format(self) -> None:
        # On the loop's thread, a slice at a time: formatting needs the interpreter anyway,
        # and doing it here spares the two threads handing it back and forth (on one core,
        # that cost more than the formatting). The thread only writes.
        self._formatting = False
        batch = self._batch
        if not batch:
            return
        self._batch = []
        data = format_batch(batch, time.time() - time.monotonic())
        self._chunks.append(data)
        self._chunk_bytes += len(data)
        self._chunk_records += len(batch)
        if self._chunk_bytes >= _HAND_BYTES:
            self._hand()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self._flush_interval, self.flush)

    def _hand(self) -> None:
        if not self._chunks:
            return
        data = b"".join(self._chunks)
        records = self._chunk_records
        self._chunks = []
        self._chunk_bytes = self._chunk_records = 0
        if self._handed - self._done >= self._max_pending or self._thread is None:
            self.dropped += records
            return
        self._handed += 1
        self.written += records
        self._queue.put(data)

    # -- the writer thread ---------------------------------------------------------------

    def _open(self) -> int:
        if self.path == "-":
            return sys.stdout.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                if self._reopen.is_set() and self.path != "-":
                    self._reopen.clear()
                    old, self._fd = self._fd, self._open()
                    os.close(old)
                view = memoryview(item)
                while view:  # a pipe may take part of a write
                    view = view[os.write(self._fd, view) :]
            except Exception:
                _log.exception("writing the access log to %s failed", self.path)
            finally:
                self._done += 1
