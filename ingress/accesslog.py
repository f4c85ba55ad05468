"""The access log: one JSON line per request, written in blocks off the request path.

When an exchange ends, after the response's last bytes went out (or when its connection
closes first: the client gone, a malformed request, a tunnel's end), the proxy makes the
request's line with :func:`line` and :meth:`AccessLog.record` keeps it in the block being
filled. Every ``flush_interval`` or 256 lines the block goes to one writer thread, which joins
and writes it with one ``write``.

The line is made in C (``ingress/_logline.c``) when that module was built, as ``pip install``
does where a C compiler is found; else by :func:`py_line`, which encodes an :class:`Entry`
with msgspec: the same bytes (the tests hold them to it), at several times the cost.

What it costs, measured: the Python line took about 16,000 instructions per request, close to
a tenth of everything the proxy does for a small one, and the proxy's throughput fell by about
that share (7-12% in ``bench proxy``, small bodies, 50 connections), however the work was
moved around: a writer thread or none, formatting in batches or line by line, a file or
/dev/null. Only doing less helped, so the line is made in C, without intermediate objects
(texts are read where they are, durations are integer microseconds). A block is a list of
lines, joined once by the writer: appending each line to one growing buffer re-copied it
at every resize (a tenth of the Python line's instructions were that ``memcpy``).

A slow destination (a full pipe, a stalled disk) never blocks the loop: blocks wait in a
bounded queue, and past ``max_pending`` blocks new records are dropped and counted
(:attr:`dropped`), because a proxy that stops serving to keep its log complete is worse than
a gap in the log.

Times: a line's ``time`` is the request's arrival, RFC 3339 UTC with milliseconds. The proxy
measures in ``time.monotonic_ns()``; the line adds :attr:`AccessLog.offset`, the wall clock
minus the monotonic one, which is read again every second (:data:`CLOCK_REFRESH`), so a
stepped wall clock shows within a second, as in nginx's cached time. Durations are integer
microseconds: exact, and cheap to make.

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
from typing import TYPE_CHECKING

import msgspec

__all__ = ["IMPLEMENTATION", "AccessLog", "Entry", "line", "py_line"]

_log = logging.getLogger(__name__)


class Entry(msgspec.Struct, gc=False):
    """One request's line, fields in the line's order (what the README documents).
    ``gc=False``: it holds no containers, so the collector need not track it for the moment
    it lives (made, encoded, freed)."""

    time: str  # arrival, RFC 3339 UTC with milliseconds
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
    queue_us: int  # arrival to an instance's slot (to the end, if none was given)
    upstream_us: int | None  # instance chosen to response head; None: no answer
    total_us: int  # arrival to the response's last byte


# Lines handed to the writer at once (else at the flush interval): about 64 KiB of them.
_HAND_LINES = 256
CLOCK_REFRESH = 1.0  # seconds between readings of the wall clock's offset

_encode = msgspec.json.Encoder().encode
_date_second = -1
_date_text = ""


def py_line(
    offset: int,
    t0: int,
    granted: int,
    answered: int,
    end: int,
    request_id: bytes | str,
    trace_id: bytes | str | None,
    client: bytes | str,
    method: bytes | str | None,
    path: bytes | str | None,
    host: bytes | str | None,
    service: bytes | str | None,
    instance: bytes | str | None,
    status: int,
    bytes_in: int,
    bytes_out: int,
) -> bytes:
    """A request's line, ending in a newline. Times are ``time.monotonic_ns()`` values (-1:
    never), ``offset`` the wall clock minus the monotonic one; texts may be bytes (read as
    latin-1, so any byte stays one character) or str. The C :func:`line` makes the same."""
    global _date_second, _date_text
    ms = (t0 + offset) // 1_000_000
    second, millis = divmod(ms, 1000)
    if second != _date_second:  # the lines of one second share its text
        _date_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _date_second = second
    entry = Entry(
        f"{_date_text}.{millis:03d}Z",
        _text(request_id) or "",
        _text(trace_id),
        _text(client) or "",
        _text(method),
        _text(path),
        _text(host),
        _text(service),
        _text(instance),
        status,
        bytes_in,
        bytes_out,
        ((granted if granted >= 0 else end) - t0) // 1000,
        (answered - granted) // 1000 if answered >= 0 else None,
        (end - t0) // 1000,
    )
    return _encode(entry) + b"\n"


def _text(value: bytes | str | None) -> str | None:
    return value.decode("latin-1") if isinstance(value, bytes) else value


if TYPE_CHECKING:
    # the C line takes what py_line takes (the tests hold them to it): one signature to check
    line = py_line
else:
    try:
        from ingress._logline import line
    except ImportError:  # not built (no C compiler where it was installed): the same, slower
        line = py_line
IMPLEMENTATION = "python" if line is py_line else "c"


class AccessLog:
    """Keeps lines on the loop and writes them in blocks from a thread to ``path`` ("-":
    stdout)."""

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
        # wall-clock minus monotonic time, for the lines' arrival times (refreshed each second)
        self.offset = time.time_ns() - time.monotonic_ns()
        self._clock_timer: asyncio.TimerHandle | None = None
        self._lines: list[bytes] = []  # lines not handed over yet
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
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
        self.refresh_clock()
        if IMPLEMENTATION == "python":
            _log.warning(
                "access log lines are made in Python (ingress._logline was not built: no C "
                "compiler at install time?); reinstall with one for about a tenth of the cost"
            )

    def refresh_clock(self) -> None:
        """Read the wall clock's offset again (the wall clock may be stepped), and again in a
        second."""
        self.offset = time.time_ns() - time.monotonic_ns()
        if self._loop is not None:
            self._clock_timer = self._loop.call_later(CLOCK_REFRESH, self.refresh_clock)

    def record(self, line: bytes) -> None:
        """One finished request's line (from :func:`line`); it waits in the block being
        filled."""
        lines = self._lines
        lines.append(line)
        if len(lines) >= _HAND_LINES:
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
        if self._clock_timer is not None:
            self._clock_timer.cancel()
            self._clock_timer = None
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, thread.join)
        if self._fd >= 0 and self.path != "-":  # stdout is not ours to close
            os.close(self._fd)
        self._fd = -1

    def _hand(self) -> None:
        data = self._lines
        if not data:
            return
        records = len(data)
        self._lines = []
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
                view = memoryview(b"".join(item))
                while view:  # a pipe may take part of a write
                    view = view[os.write(self._fd, view) :]
            except Exception:
                _log.exception("writing the access log to %s failed", self.path)
            finally:
                self._done += 1
