"""Per-service logs as JSON lines, like App Runner's application and system log groups.

Layout, under the log directory (``--log-dir``, default ``logs`` in the state directory)::

    <service>/system.log    the scaler's events for the service (SYSTEM_EVENTS)
    <service>/app.log       its instances' stdout and stderr, a record per line
    <service>/*.log.1 .2 .3 the rotated ones, .3 the oldest

Directories are mode 0750 and files 0640 (readable by the group: an operators' group may
read logs without being root). A file is rotated once it passes ``MAX_BYTES`` (10 MiB):
``.2`` becomes ``.3`` (the old ``.3`` is dropped), ``.1`` becomes ``.2``, the file ``.1``,
and writing starts a new one; so a service keeps at most ~40 MiB of each kind.

Every record is one JSON object on one line, UTF-8, its keys in this order::

    {"time": "2026-11-26T12:00:00.123Z", "service": "hello", "event": "scale",
     "message": "scale up 1 -> 2: ...", ...event-specific fields}
    {"time": "...", "service": "hello", "instance": "hello-3f9a2c", "stream": "stdout",
     "message": "the line, without its newline"}

``time`` is RFC 3339 in UTC with milliseconds, always in that one form, so records compare
by their time as strings (what ``since`` does). ``stream`` is ``stdout`` or ``stderr``
(Docker keeps them apart) or ``output`` (the process runtime's one file of both, in the
order the app wrote them). System records' fields: ``instance``, ``exit_code``,
``took_seconds``, ``from``, ``to``, ``reason`` where they apply; ``scale`` adds
``desired_from``, ``desired_to`` and the numbers decide() saw; ``usage`` (for `tidegate
cost`) has ``active_seconds`` and ``idle_seconds`` (instance-seconds since the service's
previous usage record), ``cpu`` (vCPU) and ``memory_bytes`` per instance.

**Writing** (:class:`ServiceLogs`) is off the event loop's critical path: a call encodes its
record (msgspec, a few microseconds) and appends the bytes to a buffer under a lock; a writer
thread writes the buffers out within ``FLUSH_INTERVAL`` (200 ms) of the first record that
arrived, and everything on :meth:`ServiceLogs.close`. A thread, not ``loop.call_later``: a
``write()`` to a regular file blocks as long as the disk likes (writeback under memory
pressure, a slow or network disk), and on the loop that stall would hold every request
``tidegate up``'s ingress is proxying and every health check; in a thread it holds only the
logs. Buffered: one ``write()`` per file per flush, not per line, so a chatty instance costs
a system call per 200 ms. Appending is thread-safe, so a log follower thread could call it.

**Reading**: :func:`read_records` (what the files hold, rotated ones first, optionally only
from a time on) and :class:`Follower` / :func:`follow_records` (``tail -F``: new records as
they are written, across rotations, by polling, as tail does without inotify).

The pure parts (time formats, records, line splitting) are apart from the I/O.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from ingress.units import parse_duration

__all__ = [
    "APP_LOG",
    "FLUSH_INTERVAL",
    "KEEP",
    "MAX_BYTES",
    "MAX_LINE",
    "SYSTEM_EVENTS",
    "SYSTEM_LOG",
    "Follower",
    "LineSplitter",
    "LogsNotFound",
    "ServiceLogs",
    "app_record",
    "decode_record",
    "encode_record",
    "follow_records",
    "format_record",
    "format_time",
    "log_files",
    "parse_since",
    "parse_time",
    "read_records",
    "service_dir",
    "system_record",
]

_log = logging.getLogger("tidegate.scaler")

SYSTEM_LOG = "system.log"
APP_LOG = "app.log"
MAX_BYTES = 10 * 1024 * 1024  # a file past this is rotated
KEEP = 3  # rotated files kept: .1 .2 .3
FLUSH_INTERVAL = 0.2  # seconds from a record's arrival to its write, at most (and a little)
MAX_LINE = 16 * 1024  # bytes of one app line; longer ones are cut, as Docker cuts at 16 KiB
CURSOR_INTERVAL = 5.0  # seconds between saves of the app cursors while output flows
CURSORS = ".app-cursors.json"  # per service: the time of each instance's last collected line
DIR_MODE = 0o750
FILE_MODE = 0o640

SYSTEM_EVENTS = frozenset(
    {
        "starting",  # an instance is asked for
        "started",  # the runtime runs it (not healthy yet)
        "ready",  # healthy: routed
        "unhealthy",  # failed its checks while ready, or an adopted one never passed them
        "draining",  # taken out of routing; stopped once its requests are done
        "drained",  # its requests are done (or the drain time ran out)
        "stopped",  # removed from the runtime
        "exited",  # ended by itself (exit_code)
        "start_failed",  # the runtime refused, or it died or timed out before healthy
        "backoff",  # a start is held back after failed ones
        "scale",  # the desired count changed, with the numbers behind it
        "adopted",  # found running at start, left by an earlier scaler
        "replaced",  # a new revision replaces the running one (from, to), or an old instance
        "paused",
        "resumed",
        "applied",  # a service file loaded, created, updated, replaced, unchanged, deleted
        "usage",  # instance-seconds since the previous usage record, for `tidegate cost`
    }
)

_SERVICE_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")  # as in service files
_DAYS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*d\s*$")
_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder()


class LogsNotFound(LookupError):
    """The log directory has nothing for this service."""


# -- pure: times, records, lines ---------------------------------------------------------------


_second: tuple[int, str] = (-1, "")  # the last second formatted: records come many a second


def format_time(epoch: float) -> str:
    """RFC 3339 in UTC with milliseconds: ``2026-11-26T12:00:00.123Z``."""
    global _second
    seconds, millis = divmod(round(epoch * 1000), 1000)
    cached, text = _second
    if cached != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _second = (seconds, text)  # one tuple: a thread reading it sees old or new, whole
    return f"{text}.{millis:03d}Z"


def parse_time(text: str) -> float:
    """Epoch seconds from an RFC 3339 time (``Z`` or an offset; a fraction optional);
    ValueError for anything else, a time without a zone included."""
    moment = datetime.datetime.fromisoformat(text.strip())
    if moment.tzinfo is None:
        raise ValueError(f"no time zone in {text!r} (end it with Z or +HH:MM)")
    return moment.timestamp()


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration before ``now`` (``90s``, ``10m``, ``2h``, ``7d``) or an RFC 3339
    time, as epoch seconds; ValueError otherwise."""
    days = _DAYS.match(text)
    if days is not None:
        return now - float(days.group(1)) * 86400.0
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"not a duration or a time: {text!r} (use e.g. 10m, 2h, 7d or 2026-11-26T12:00:00Z)"
        ) from None


def system_record(
    when: float, service: str, event: str, message: str, fields: dict[str, Any]
) -> dict[str, Any]:
    """A system record: time, service, event, message, then ``fields`` in their order."""
    if event not in SYSTEM_EVENTS:
        raise ValueError(f"unknown system event {event!r}")
    record: dict[str, Any] = {
        "time": format_time(when),
        "service": service,
        "event": event,
        "message": message,
    }
    for key, value in fields.items():
        record[key] = round(value, 3) if isinstance(value, float) else value
    return record


def app_record(
    when: float, service: str, instance: str, stream: str, message: str
) -> dict[str, Any]:
    """An app record: one line an instance wrote."""
    return {
        "time": format_time(when),
        "service": service,
        "instance": instance,
        "stream": stream,
        "message": message,
    }


def encode_record(record: dict[str, Any]) -> bytes:
    """One JSON line, newline included."""
    return _ENCODER.encode(record) + b"\n"


def decode_record(line: bytes) -> dict[str, Any] | None:
    """The record on a line, or None for a line that is not one (a torn write, garbage)."""
    try:
        record = _DECODER.decode(line)
    except msgspec.DecodeError:
        return None
    if not isinstance(record, dict) or not isinstance(record.get("time"), str):
        return None
    return record


def format_record(record: dict[str, Any]) -> str:
    """A record for people: ``TIME  EVENT  message`` (system) or ``TIME  INSTANCE  STREAM
    message`` (app)."""
    when = record.get("time", "")
    message = str(record.get("message", ""))
    if "event" in record:
        return f"{when}  {record['event']!s:<12}  {message}"
    return f"{when}  {record.get('instance', '-')}  {record.get('stream', '-')}  {message}"


class LineSplitter:
    """Bytes in, complete lines out (without their ``\\n`` or ``\\r\\n``), decoded as UTF-8
    with undecodable bytes replaced. A line is held until its newline arrives; one longer
    than ``max_line`` bytes is given out in pieces of that size. Sans-IO."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max = max_line
        self._partial = b""
        self._used = 0  # bytes of the stream in the lines given out so far

    @property
    def pending(self) -> int:
        """Bytes held: the start of a line whose newline has not come."""
        return len(self._partial)

    @property
    def used(self) -> int:
        """Bytes of the stream in the lines given out so far (newlines included)."""
        return self._used

    def feed(self, data: bytes) -> list[str]:
        return [line for line, _ in self.split(data)]

    def split(self, data: bytes) -> list[tuple[str, int]]:
        """The lines ``data`` completes, each with the stream's byte count up to its end (a
        reader's position once that line is handled)."""
        buffer = self._partial + data if self._partial else data
        lines: list[tuple[str, int]] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            self._cut(buffer[start:end], 1, lines)
            start = end + 1
        rest = buffer[start:]
        while len(rest) >= self._max:
            self._give(rest[: self._max], 0, lines)
            rest = rest[self._max :]
        self._partial = rest
        return lines

    def flush(self) -> list[str]:
        """The unfinished line at the end of a stream, if any."""
        rest, self._partial = self._partial, b""
        self._used += len(rest)
        return [_text(rest)] if rest else []

    def _cut(self, line: bytes, newline: int, lines: list[tuple[str, int]]) -> None:
        while len(line) > self._max:
            self._give(line[: self._max], 0, lines)
            line = line[self._max :]
        self._give(line, newline, lines)

    def _give(self, piece: bytes, newline: int, lines: list[tuple[str, int]]) -> None:
        self._used += len(piece) + newline
        lines.append((_text(piece), self._used))


def _text(line: bytes) -> str:
    return line.removesuffix(b"\r").decode("utf-8", errors="replace")


def service_dir(log_dir: Path, service: str) -> Path:
    """Where ``service``'s logs are; ValueError if it is not a service name (a path)."""
    if not _SERVICE_NAME.match(service):
        raise ValueError(f"not a service name: {service!r}")
    return log_dir / service


def log_files(directory: Path, name: str) -> list[Path]:
    """``name``'s files in ``directory``, oldest first: ``name.N`` ... ``name.1``, ``name``;
    those that exist."""
    rotated: list[tuple[int, Path]] = []
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            suffix = entry.name.removeprefix(name + ".")
            if entry.name.startswith(name + ".") and suffix.isdigit():
                rotated.append((int(suffix), entry))
    files = [path for _, path in sorted(rotated, reverse=True)]
    current = directory / name
    if current.exists():
        files.append(current)
    return files


# -- writing -----------------------------------------------------------------------------------


@dataclass
class _Open:
    fd: int
    inode: int
    size: int


class ServiceLogs:
    """Writes the services' system and app records under ``log_dir`` (see the module's rules).

    ``clock`` gives wall-clock epoch seconds. Cursors: the time of each instance's last
    collected line is kept and saved (``.app-cursors.json`` per service, at most every
    ``CURSOR_INTERVAL`` while output flows, and on close), so a restarted scaler continues
    an adopted instance's output where this one stopped (:meth:`cursor`)."""

    def __init__(
        self,
        log_dir: Path,
        *,
        max_bytes: int = MAX_BYTES,
        keep: int = KEEP,
        flush_interval: float = FLUSH_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.log_dir = log_dir
        self._max_bytes = max_bytes
        self._keep = keep
        self._flush_interval = flush_interval
        self._clock = clock
        _make_dir(log_dir)
        self._lock = threading.Lock()  # the buffers and cursors
        self._io_lock = threading.Lock()  # the files (the thread, flush() and close())
        self._pending: dict[Path, list[bytes]] = {}
        self._cursors: dict[str, dict[str, float]] = {}
        self._cursors_dirty: set[str] = set()
        self._cursors_saved_at = 0.0
        self._files: dict[Path, _Open] = {}
        self._failed: set[Path] = set()  # paths whose last write failed (warned once)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tidegate-logs", daemon=True)
        self._thread.start()

    def system(self, service: str, event: str, message: str, **fields: Any) -> None:
        """A system record for ``service`` (``event`` one of SYSTEM_EVENTS)."""
        record = system_record(self._clock(), service, event, message, fields)
        self._append(self.log_dir / service / SYSTEM_LOG, encode_record(record))

    def app(
        self, service: str, instance: str, stream: str, line: str, when: float | None = None
    ) -> None:
        """One line of an instance's output; ``when`` defaults to now."""
        when = self._clock() if when is None else when
        data = encode_record(app_record(when, service, instance, stream, line))
        path = self.log_dir / service / APP_LOG
        with self._lock:
            cursors = self._cursors.get(service)
            if cursors is None:  # an earlier scaler's, kept for its instances still running
                cursors = self._cursors[service] = _load_cursors(self.log_dir / service / CURSORS)
            if when > cursors.get(instance, 0.0):
                cursors[instance] = when
                self._cursors_dirty.add(service)
            self._pending.setdefault(path, []).append(data)
        self._queued()

    def cursor(self, service: str, instance: str) -> float | None:
        """The time of ``instance``'s last collected line, as saved by this or an earlier
        scaler; None if none was."""
        with self._lock:
            if service not in self._cursors:
                self._cursors[service] = _load_cursors(self.log_dir / service / CURSORS)
            return self._cursors[service].get(instance)

    def forget(self, service: str, instance: str) -> None:
        """``instance`` is gone: its cursor is no longer needed."""
        with self._lock:
            cursors = self._cursors.get(service)
            if cursors is not None and cursors.pop(instance, None) is not None:
                self._cursors_dirty.add(service)
        self._wake.set()

    def flush(self) -> None:
        """Write what is buffered now, in the caller's thread."""
        self._write_pending(save_cursors=True)

    def close(self) -> None:
        """Write everything and stop the writer thread; later records are written at once."""
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._write_pending(save_cursors=True)
        self._close_files()

    # -- inside -----------------------------------------------------------------------------

    def _append(self, path: Path, data: bytes) -> None:
        with self._lock:
            self._pending.setdefault(path, []).append(data)
        self._queued()

    def _queued(self) -> None:
        if self._stop.is_set():  # closed: nobody else will write it
            self._write_pending(save_cursors=True)
            self._close_files()
        else:
            self._wake.set()

    def _close_files(self) -> None:
        with self._io_lock:
            for entry in self._files.values():
                os.close(entry.fd)
            self._files.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._stop.wait(self._flush_interval)  # gather what comes meanwhile; close cuts short
            self._wake.clear()  # before taking the buffers: a record after this wakes us again
            self._write_pending(save_cursors=False)

    def _write_pending(self, *, save_cursors: bool) -> None:
        with self._io_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                now = time.monotonic()
                due = save_cursors or now - self._cursors_saved_at >= CURSOR_INTERVAL
                cursors: dict[str, dict[str, float]] = {}
                if due and self._cursors_dirty:
                    cursors = {s: dict(self._cursors.get(s, {})) for s in self._cursors_dirty}
                    self._cursors_dirty.clear()
                    self._cursors_saved_at = now
            for path, chunks in pending.items():
                self._write(path, b"".join(chunks))
            # after the lines they stand for: a cursor never runs ahead of what is on disk
            for service, values in cursors.items():
                self._save_cursors(service, values)

    def _write(self, path: Path, data: bytes) -> None:
        try:
            entry = self._files.get(path)
            if entry is not None and _inode(path) != entry.inode:  # moved or removed outside
                os.close(entry.fd)
                del self._files[path]
                entry = None
            if entry is None:
                entry = self._files[path] = _open_log(path)
            view = memoryview(data)
            while view:
                written = os.write(entry.fd, view)
                view = view[written:]
            entry.size += len(data)
            self._failed.discard(path)
            if entry.size >= self._max_bytes:
                self._rotate(path)
        except OSError as exc:
            if path not in self._failed:  # once until it works again, not per flush
                self._failed.add(path)
                _log.warning("writing %s failed: %s (records dropped)", path, exc)

    def _rotate(self, path: Path) -> None:
        entry = self._files.pop(path)
        os.close(entry.fd)
        for n in range(self._keep, 0, -1):
            source = path if n == 1 else path.with_name(f"{path.name}.{n - 1}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(source, path.with_name(f"{path.name}.{n}"))
        if self._keep < 1:
            path.unlink(missing_ok=True)

    def _save_cursors(self, service: str, values: dict[str, float]) -> None:
        path = self.log_dir / service / CURSORS
        partial = path.with_name(path.name + ".partial")
        try:
            _make_dir(path.parent)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
            try:
                os.write(fd, json.dumps(values, sort_keys=True).encode())
            finally:
                os.close(fd)
            os.replace(partial, path)
        except OSError as exc:
            _log.warning("saving %s failed: %s", path, exc)


def _make_dir(path: Path) -> None:
    if not path.is_dir():
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(path, DIR_MODE)  # mkdir's mode is cut by the umask


def _open_log(path: Path) -> _Open:
    _make_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
    st = os.fstat(fd)
    if st.st_mode & 0o777 != FILE_MODE and st.st_uid == os.geteuid():
        os.fchmod(fd, FILE_MODE)  # the umask may have cut it
    return _Open(fd, st.st_ino, st.st_size)


def _inode(path: Path) -> int | None:
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _load_cursors(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {
        str(k): float(v)
        for k, v in data.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


# -- reading -----------------------------------------------------------------------------------


def _files_for(log_dir: Path, service: str, system: bool) -> tuple[Path, str]:
    directory = service_dir(log_dir, service)
    if not directory.is_dir():
        raise LogsNotFound(f"no logs for service {service!r} in {log_dir}")
    return directory, SYSTEM_LOG if system else APP_LOG


def _since_text(since: float | None) -> str | None:
    # Records' times all have one form, so comparing them as strings compares the times.
    return None if since is None else format_time(since)


def read_records(
    log_dir: Path, service: str, *, system: bool, since: float | None = None
) -> Iterator[dict[str, Any]]:
    """The service's system or app records, rotated files first (oldest first); with
    ``since`` (epoch seconds) only those at or after it. LogsNotFound if the service has
    no directory; ValueError if ``service`` is not a service name. Lines that are not
    records are skipped."""
    directory, name = _files_for(log_dir, service, system)
    threshold = _since_text(since)
    files: list[BinaryIO] = []
    try:
        # All opened before any is read: a rotation meanwhile renames, and open files keep
        # their contents, so the set stays one consistent snapshot.
        for path in log_files(directory, name):
            with contextlib.suppress(FileNotFoundError):
                files.append(path.open("rb"))
        for file in files:
            for line in file:
                record = decode_record(line)
                if record is not None and (threshold is None or record["time"] >= threshold):
                    yield record
    finally:
        for file in files:
            file.close()


class Follower:
    """``tail -F`` over one service's system or app log: :meth:`poll` returns the records
    written since its last call (the first call: what the files hold, rotated ones first),
    without waiting. It notices a rotation by the file's inode changing, reads the old file
    to its end, then the new one from its start. A line whose end has not been written yet
    waits for the next call. Two rotations between calls (over 10 MiB in one interval) would
    skip the middle file."""

    def __init__(
        self, log_dir: Path, service: str, *, system: bool, since: float | None = None
    ) -> None:
        directory, name = _files_for(log_dir, service, system)
        self._path = directory / name
        self._threshold = _since_text(since)
        self._backlog: list[BinaryIO] = []
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self._partial = b""
        for path in log_files(directory, name):
            with contextlib.suppress(FileNotFoundError):
                file = path.open("rb")
                if path == self._path:
                    self._file, self._inode = file, os.fstat(file.fileno()).st_ino
                else:
                    self._backlog.append(file)

    def poll(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while self._backlog:
            with self._backlog.pop(0) as file:
                self._read(file, out, final=True)
        if self._file is not None:
            self._read(self._file, out, final=False)
        inode = _inode(self._path)
        if self._file is not None and inode != self._inode:
            self._read(self._file, out, final=True)  # what came before the rename
            self._file.close()
            self._file, self._inode = None, None
        if self._file is None and inode is not None:
            with contextlib.suppress(FileNotFoundError):
                self._file = self._path.open("rb")
                self._inode = os.fstat(self._file.fileno()).st_ino
                self._read(self._file, out, final=False)
        return out

    def close(self) -> None:
        for file in [*self._backlog, *([self._file] if self._file else [])]:
            file.close()
        self._backlog, self._file = [], None

    def __enter__(self) -> Follower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, file: BinaryIO, out: list[dict[str, Any]], *, final: bool) -> None:
        data = file.read()
        if not data and not final:
            return
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = b"" if final else lines.pop()
        for line in lines:
            record = decode_record(line) if line else None
            if record is not None and (
                self._threshold is None or record["time"] >= self._threshold
            ):
                out.append(record)


def follow_records(
    log_dir: Path,
    service: str,
    *,
    system: bool,
    since: float | None = None,
    interval: float = FLUSH_INTERVAL,
) -> Iterator[dict[str, Any]]:
    """What :func:`read_records` gives, then every new record as it is written, forever
    (polling every ``interval`` seconds); close the generator to stop."""
    with Follower(log_dir, service, system=system, since=since) as follower:
        while True:
            yield from follower.poll()
            time.sleep(interval)
