"""The access log: one JSON line per request, written in blocks off the request path.

When an exchange ends, after the response's last bytes went out (or when its connection
closes first: the client gone, a malformed request, a tunnel's end), the proxy makes an
:class:`Entry` and :meth:`AccessLog.record` encodes it at once, with one call into msgspec
(C, which also does the JSON escaping and the nulls), onto the end of the block being
filled. Every ``flush_interval`` or 64 KiB the block goes to one writer thread, which writes
it with one ``write``. Nothing waits as objects between requests: the Entry is freed as
soon as it is encoded, so the next request's reuses the same (cached) memory.

What it costs, measured (``bench proxy``, ``tidegate+log``, small bodies, 50 connections):
5-15% of throughput, the spread being the benchmark's noise. Formatting in Python, line by
line, in the writer thread cost 19%; in slices on the loop, 9%. Same-run comparisons (per
request CPU from /proc) put the cost in the process's own work on the loop, not in the
hand-over: writing on the loop with no thread, formatting in batches of 256, or writing to
/dev/null cost the same within the noise; making the Entry without encoding it cost about
half. In the process, that work runs several times slower than the same code measured alone
(about 3 µs a line), as every request's Python runs with caches the kernel's networking has
just emptied, so its share is roughly its share of the instructions (7%).

A slow destination (a full pipe, a stalled disk) never blocks the loop: blocks wait in a
bounded queue, and past ``max_pending`` blocks new records are dropped and counted
(:attr:`dropped`), because a proxy that stops serving to keep its log complete is worse than
a gap in the log.

Times: a line's ``time`` is the request's arrival, RFC 3339 UTC with milliseconds. The proxy
measures in ``time.monotonic_ns()``; :meth:`AccessLog.stamp_at` turns that into text, and the
text of the current millisecond is kept (:attr:`AccessLog.stamp`, valid for monotonic times in
``[stamp_from, stamp_until)``), so most requests reuse it. With 50 connections, about half the
lines finish after a newer request moved that on (measured: 20,000 ``stamp_at`` calls for
35,500 lines), so the texts of recent milliseconds are kept too, and the clocks' offset is
read only for a millisecond not seen yet (a call went from 1.7 to 0.57 µs). Durations are
milliseconds from integer nanoseconds, so they carry no float noise (``0.400125``).

``reopen()`` (SIGUSR1) makes the writer close and reopen the file before its next write, so
logrotate can move the file away and signal; standard output is never reopened.
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

__all__ = ["AccessLog", "Entry"]

_log = logging.getLogger(__name__)


class Entry(msgspec.Struct, gc=False):
    """One request's line, fields in the line's order (what the README documents).
    ``gc=False``: it holds no containers, so the collector need not track it for the moment
    it lives (made, encoded, freed)."""

    time: str  # arrival, RFC 3339 UTC with milliseconds (AccessLog.stamp_at)
    request_id: str
    trace_id: str | None  # None: the request went to no instance
    client: str
    method: str | None  # None, and path too: the head never came whole (the ingress's 4xx/5xx)
    path: str | None
    host: str | None  # None: an HTTP/1.0 request without Host
    service: str | None  # None: no service took the request
    instance: str | None
    status: int  # 499: the client left before any answer (nothing was sent)
    bytes_in: int  # request body
    bytes_out: int  # response body from the instance
    queue_ms: float  # arrival to an instance's slot (to the end, if none was given)
    upstream_ms: float | None  # instance chosen to response head; None: no answer
    total_ms: float  # arrival to the response's last byte


_STAMPS_KEPT = 4096  # milliseconds' texts kept, then dropped all at once (a miss only formats)
_HAND_BYTES = 64 * 1024  # bytes handed to the writer at once (else at the flush interval)

_encode_into = msgspec.json.Encoder().encode_into


class AccessLog:
    """Collects records on the loop, formats them there in slices, and writes them from a
    thread to ``path`` ("-": stdout)."""

    def __init__(
        self,
        path: str,
        *,
        flush_interval: float = 0.1,
        max_pending: int = 256,
    ) -> None:
        self.path = path
        self.dropped = 0  # records not written because the writer fell behind
        self.written = 0  # records handed to the writer
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        # the text of the current millisecond, for monotonic times in [from, until)
        self.stamp = ""
        self.stamp_from = 0
        self.stamp_until = -1
        self._second = -1
        self._date = ""  # the text of _second, to which stamps add the milliseconds
        # wall-clock minus monotonic time, read again at each new millisecond (the wall clock
        # may step), and the texts of recent wall-clock milliseconds: with many connections,
        # half the lines finish after a newer request set `stamp`, and formatting their time
        # anew cost more than the rest of the line
        self._offset = time.time_ns() - time.monotonic_ns()
        self._stamps: dict[int, str] = {}
        self._buf = bytearray()  # lines not handed over yet
        self._buf_records = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
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

    def stamp_at(self, monotonic_ns: int) -> str:
        """The RFC 3339 text of a ``time.monotonic_ns()`` time; it becomes :attr:`stamp`
        unless it is older than that (a long request finishing among short ones)."""
        offset = self._offset
        ms = (monotonic_ns + offset) // 1_000_000
        text = self._stamps.get(ms)
        if text is None:  # a millisecond not seen yet (the first of a new one, mostly)
            self._offset = offset = time.time_ns() - time.monotonic_ns()
            ms = (monotonic_ns + offset) // 1_000_000
            text = self._format(ms)
        if monotonic_ns >= self.stamp_until:
            self.stamp = text
            self.stamp_from = ms * 1_000_000 - offset
            self.stamp_until = self.stamp_from + 1_000_000
        return text

    def _format(self, ms: int) -> str:
        stamps = self._stamps
        if len(stamps) >= _STAMPS_KEPT:
            stamps.clear()
        second, millis = divmod(ms, 1000)
        if second != self._second:
            self._second = second
            self._date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        text = stamps[ms] = f"{self._date}.{millis:03d}Z"
        return text

    def record(self, entry: Entry) -> None:
        """One finished request, encoded at once into the block being filled."""
        buf = self._buf
        _encode_into(entry, buf, -1)
        buf.append(10)  # "\n"
        self._buf_records += 1
        if len(buf) >= _HAND_BYTES:
            self._hand()
        elif self._timer is None and self._loop is not None:
            self._timer = self._loop.call_later(self._flush_interval, self.flush)

    def flush(self) -> None:
        """Hand what waits to the writer now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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

    def _hand(self) -> None:
        if not self._buf_records:
            return
        data, records = self._buf, self._buf_records
        self._buf = bytearray()
        self._buf_records = 0
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
