"""The process runtime: each instance is a local command, for development, hosts without Docker
and the demo.

Its rules, which mirror what Docker does for a container so the scaler sees one behaviour:

- An instance is ``spec.command`` (an argv, never a shell) in ``spec.workdir``, in a session
  and process group of its own, with ``spec.env`` plus only ``PATH``, ``HOME`` and ``LANG``
  from the scaler's environment. Its stdout and stderr go to one file,
  ``<state_dir>/logs/<id>.log``, in the order written.
  Processes share the host network: the instance listens on ``PORT`` from ``spec.env`` (the
  scaler chose it) and its address is ``127.0.0.1:PORT``. ``cpu`` and ``memory`` are not
  enforced.
- Stopping sends SIGTERM to the whole group, waits up to ``grace`` for the command to exit,
  then SIGKILLs the group; once the command is gone, whatever it left in its group is
  SIGKILLed too, as Docker kills a container's other processes when its PID 1 exits. The
  same clean-up follows a command that exits by itself.
- Each instance has a record, ``<state_dir>/instances/<id>.json``: pid, process group, labels
  and the process's start time from ``/proc/<pid>/stat`` (with the boot id). A new runtime
  over the same state dir, at its first call, adopts the recorded processes that still run,
  after checking the pid still names the same process (pids are reused), and deletes the
  other records; it never signals a process it did not adopt. :meth:`close` leaves the
  instances running for that next runtime. Records hold
  no environment at all, so no secret can leak through them; the runtime logs ids and pids,
  never the environment.
- Exits are awaited, not polled: a pidfd (Linux 5.3+) becomes readable when its process exits,
  for our children and for adopted processes alike. Children are started with
  :class:`subprocess.Popen` rather than asyncio's subprocess transport, because closing or
  collecting that transport kills the child, and instances must outlive a scaler restart.
- An exit on the instance's own yields ``RuntimeEvent("exited")``; :meth:`stop` yields
  ``"removed"``. Exit codes follow the shell's convention (128 + signal number, as Docker
  reports them); an adopted process's exit code is unknown (None) unless it is our child.

- :meth:`~ProcessRuntime.logs` tails that file. A file, not a pipe: the instance must outlive
  the scaler, and with a pipe it would get EPIPE (or block) once the scaler is gone; its file
  just grows until the next scaler reads on. Lines are dated when read (the file has no
  times), within ``_TAIL_INTERVAL``. The byte offset given so far is saved beside the file
  (``<id>.pos``, every ``_POSITION_SAVE_INTERVAL`` and when the reader stops), so the next
  reader of an adopted instance continues there: nothing lost across a scaler restart, at
  most a few seconds repeated after a crash. Both files are removed with the instance.

The runtime is Linux-only: adoption and identity checks read ``/proc``. ``start`` blocks the
loop for the fork and exec and one small file write, as asyncio's own subprocess support does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import msgspec

from scaler.logs import LineSplitter
from scaler.runtime import (
    LABEL_INSTANCE,
    LABEL_PORT,
    LABEL_REVISION,
    LABEL_SERVICE,
    InstanceInfo,
    InstanceState,
    LaunchError,
    LaunchSpec,
    LogLine,
    RuntimeEvent,
)
from scaler.runtimes._events import Closed, EventStream

__all__ = ["ProcessRuntime"]

_log = logging.getLogger(__name__)

# What an instance inherits from the scaler's environment: enough to find programs and to
# decode text, nothing that could carry the scaler's own credentials.
_INHERITED_ENV = ("PATH", "HOME", "LANG")
# Instance ids become file names, so they are held to a safe alphabet.
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Without pidfds (kernels before 5.3) exits are polled at this interval, in seconds.
_POLL_INTERVAL = 0.2
_TAIL_INTERVAL = 0.2  # seconds between looks at an instance's output file for more
_POSITION_SAVE_INTERVAL = 5.0  # seconds between saves of a reader's offset while it reads
_READ_SIZE = 64 * 1024  # bytes read at a time; the loop gets a turn between reads


class _Record(msgspec.Struct, frozen=True, kw_only=True):
    """One instance on disk, enough to adopt it after a restart. Never any environment."""

    instance_id: str
    pid: int
    pgid: int
    start_ticks: int  # /proc/<pid>/stat field 22: clock ticks after boot when it started
    boot_id: str  # /proc/sys/kernel/random/boot_id: start_ticks only mean something per boot
    address: str
    started_at: float  # wall-clock seconds
    labels: dict[str, str]


@dataclass(eq=False)
class _Instance:
    record: _Record
    info: InstanceInfo
    popen: subprocess.Popen[bytes] | None  # None when adopted from an earlier runtime
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None
    stopping: asyncio.Task[None] | None = None


class ProcessRuntime:
    """Runs instances as local process groups; state (records and logs) under `state_dir`."""

    def __init__(self, state_dir: Path) -> None:
        self._records_dir = state_dir / "instances"
        self._logs_dir = state_dir / "logs"
        for directory in (state_dir, self._records_dir, self._logs_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._instances: dict[str, _Instance] = {}
        self._events: asyncio.Queue[RuntimeEvent | Closed] = asyncio.Queue()
        self._boot_id = _boot_id()
        self._adopted = False
        self._closed = False

    def log_path(self, instance_id: str) -> Path:
        """Where an instance's stdout and stderr go."""
        return self._logs_dir / f"{instance_id}.log"

    def _position_path(self, instance_id: str) -> Path:
        return self._logs_dir / f"{instance_id}.pos"

    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        self._adopt()
        if self._closed:
            raise LaunchError(f"{spec.instance_id}: the runtime is closed")
        if not _SAFE_ID.fullmatch(spec.instance_id):
            raise LaunchError(f"instance id {spec.instance_id!r}: use letters, digits, '_.-'")
        if spec.instance_id in self._instances:
            raise LaunchError(f"{spec.instance_id}: an instance with this id already exists")
        if not spec.command:
            raise LaunchError(f"{spec.instance_id}: the process runtime needs a command")
        if spec.workdir is not None and not os.path.isdir(spec.workdir):
            raise LaunchError(f"{spec.instance_id}: no such working directory {spec.workdir!r}")
        env = _environment(spec)
        port = _port(spec, env)
        address = f"127.0.0.1:{port}"
        popen = self._spawn(spec, env)
        try:
            _, start_ticks = _proc_stat(popen.pid) or ("", 0)
            record = _Record(
                instance_id=spec.instance_id,
                pid=popen.pid,
                pgid=popen.pid,  # start_new_session: the command leads its own group
                start_ticks=start_ticks,
                boot_id=self._boot_id,
                address=address,
                started_at=time.time(),
                labels={
                    LABEL_SERVICE: spec.service,
                    LABEL_REVISION: spec.revision,
                    LABEL_INSTANCE: spec.instance_id,
                    LABEL_PORT: str(port),
                },
            )
            self._write_record(record)
        except BaseException:
            _kill_group(popen.pid, signal.SIGKILL)
            popen.wait()  # it was just SIGKILLed: this returns at once
            raise
        instance = _Instance(record, _info(record, "running"), popen)
        self._watch(instance)
        _log.info("started %s: %s as pid %d", spec.instance_id, spec.command[0], popen.pid)
        return instance.info

    async def stop(self, instance_id: str, *, grace: float = 10.0) -> None:
        self._adopt()
        if self._closed:
            raise LaunchError(f"{instance_id}: the runtime is closed")
        instance = self._instances.get(instance_id)
        if instance is None:
            return
        if instance.stopping is None:
            instance.stopping = asyncio.ensure_future(self._stop(instance, grace))
        # Shielded: a caller that gives up waiting does not leave the instance half stopped.
        await asyncio.shield(instance.stopping)

    async def list(self) -> list[InstanceInfo]:
        self._adopt()
        return [instance.info for instance in self._instances.values()]

    async def inspect(self, instance_id: str) -> InstanceInfo | None:
        self._adopt()
        instance = self._instances.get(instance_id)
        return None if instance is None else instance.info

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Exits and removals, until close(). One stream per runtime: consume it in one place."""
        return EventStream(self._events)

    def logs(self, instance_id: str, since: float | None = None) -> AsyncIterator[LogLine]:
        """The instance's output file, line by line, stream "output", until it has exited and
        the file is read to its end. With ``since`` it continues from the offset the previous
        reader saved (from the start if none did); None: from the start."""
        return self._tail(instance_id, since is not None)

    async def close(self) -> None:
        """Stops watching; the instances keep running, for the next runtime to adopt."""
        if self._closed:
            return
        self._closed = True
        tasks = [
            task
            for instance in self._instances.values()
            for task in (instance.watcher, instance.stopping)
            if task is not None and not task.done()
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._events.put_nowait(Closed())

    # -- output --------------------------------------------------------------------------

    async def _tail(self, instance_id: str, resume: bool) -> AsyncIterator[LogLine]:
        self._adopt()
        instance = self._instances.get(instance_id)
        if instance is None or self._closed:
            return
        try:
            file = self.log_path(instance_id).open("rb")
        except FileNotFoundError:
            return
        given = self._saved_position(instance_id) if resume else 0
        saved, saved_at = given, time.monotonic()
        splitter = LineSplitter()
        try:
            with file:
                if given > os.fstat(file.fileno()).st_size:
                    given = 0  # not this file's position
                file.seek(given)
                origin = given
                while True:
                    # Looked at before reading: once exited, this read gets the last bytes.
                    exited = instance.exited.is_set()
                    chunk = file.read(_READ_SIZE)
                    if chunk:
                        now = time.time()
                        for text, used in splitter.split(chunk):
                            given = origin + used  # given out: a later reader starts after it
                            yield LogLine("output", text, now)
                        if time.monotonic() - saved_at >= _POSITION_SAVE_INTERVAL:
                            saved = self._save_position(instance_id, given)
                            saved_at = time.monotonic()
                        await asyncio.sleep(0)  # a long backlog must not hold the loop
                        continue
                    if exited or self._closed:
                        if exited:
                            given = file.tell()
                            for text in splitter.flush():
                                yield LogLine("output", text, time.time())
                        return
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(_TAIL_INTERVAL):
                            await instance.exited.wait()
        finally:
            if given != saved and instance_id in self._instances:  # not once it is removed
                self._save_position(instance_id, given)

    def _saved_position(self, instance_id: str) -> int:
        try:
            return int(self._position_path(instance_id).read_text())
        except (OSError, ValueError):
            return 0

    def _save_position(self, instance_id: str, offset: int) -> int:
        path = self._position_path(instance_id)
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(str(offset))
            os.replace(partial, path)
        except OSError as error:
            _log.warning("saving the output position of %s failed: %s", instance_id, error)
        return offset

    # -- starting ------------------------------------------------------------------------

    def _spawn(self, spec: LaunchSpec, env: dict[str, str]) -> subprocess.Popen[bytes]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        log_fd = os.open(self.log_path(spec.instance_id), flags, 0o600)
        try:
            return subprocess.Popen(
                list(spec.command),
                cwd=spec.workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
            )
        except OSError as error:
            program = spec.command[0]
            reason = error.strerror or str(error)
            raise LaunchError(f"{spec.instance_id}: cannot run {program!r}: {reason}") from None
        finally:
            os.close(log_fd)

    def _write_record(self, record: _Record) -> None:
        path = self._record_path(record.instance_id)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(msgspec.json.encode(record))
        os.replace(partial, path)  # a reader never sees half a record

    def _record_path(self, instance_id: str) -> Path:
        return self._records_dir / f"{instance_id}.json"

    # -- adopting ------------------------------------------------------------------------

    def _adopt(self) -> None:
        """Once, at the first call: take over the recorded processes that still run."""
        if self._adopted:
            return
        self._adopted = True
        for path in sorted(self._records_dir.glob("*.json")):
            try:
                record = msgspec.json.decode(path.read_bytes(), type=_Record)
            except (OSError, msgspec.DecodeError) as error:
                _log.warning("dropping unreadable instance record %s: %s", path.name, error)
                path.unlink(missing_ok=True)
                continue
            if record.instance_id in self._instances:
                continue
            if not self._is_same_process(record):
                _log.info("dropping the record of %s: it is no longer running", record.instance_id)
                path.unlink(missing_ok=True)
                continue
            instance = _Instance(record, _info(record, "running"), popen=None)
            self._watch(instance)
            _log.info("adopted %s (pid %d)", record.instance_id, record.pid)

    def _is_same_process(self, record: _Record) -> bool:
        if record.pid <= 1 or record.boot_id != self._boot_id or not record.start_ticks:
            return False
        stat = _proc_stat(record.pid)
        return stat is not None and stat[0] not in "ZX" and stat[1] == record.start_ticks

    # -- watching and stopping -----------------------------------------------------------

    def _watch(self, instance: _Instance) -> None:
        self._instances[instance.record.instance_id] = instance
        instance.watcher = asyncio.ensure_future(self._await_exit(instance))

    async def _await_exit(self, instance: _Instance) -> None:
        record = instance.record
        await _wait_for_exit(record.pid, instance.popen)
        exit_code = _reap(record.pid, instance.popen)
        _kill_group(record.pgid, signal.SIGKILL)  # what the command left behind
        instance.info = _info(record, "exited", exit_code)
        instance.exited.set()
        if instance.stopping is None:
            _log.info("%s exited with %s", record.instance_id, exit_code)
            self._emit("exited", instance)

    async def _stop(self, instance: _Instance, grace: float) -> None:
        record = instance.record
        if not instance.exited.is_set():
            _kill_group(record.pgid, signal.SIGTERM)
            try:
                await asyncio.wait_for(instance.exited.wait(), grace)
            except TimeoutError:
                _log.info("%s outlived its %.1f s grace: killing it", record.instance_id, grace)
                _kill_group(record.pgid, signal.SIGKILL)
                await instance.exited.wait()
        self._record_path(record.instance_id).unlink(missing_ok=True)
        del self._instances[record.instance_id]
        # A reader has the file open still and reads it to its end; nobody else needs it.
        self.log_path(record.instance_id).unlink(missing_ok=True)
        self._position_path(record.instance_id).unlink(missing_ok=True)
        _log.info("stopped %s", record.instance_id)
        self._emit("removed", instance)

    def _emit(self, kind: Literal["exited", "removed"], instance: _Instance) -> None:
        if self._closed:
            return
        event = RuntimeEvent(
            kind=kind,
            instance_id=instance.info.instance_id,
            service=instance.info.service,
            exit_code=instance.info.exit_code,
        )
        self._events.put_nowait(event)


def _environment(spec: LaunchSpec) -> dict[str, str]:
    env = {name: os.environ[name] for name in _INHERITED_ENV if name in os.environ}
    env.setdefault("PATH", os.defpath)
    env.update(spec.env)
    env.setdefault("TIDEGATE_SERVICE", spec.service)
    env.setdefault("TIDEGATE_INSTANCE", spec.instance_id)
    return env


def _port(spec: LaunchSpec, env: dict[str, str]) -> int:
    """The scaler's PORT from the environment; the spec's port (and PORT set) when absent."""
    text = env.setdefault("PORT", str(spec.port))
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise LaunchError(f"{spec.instance_id}: PORT must be a port number (got {text!r})")
    return int(text)


def _info(record: _Record, state: InstanceState, exit_code: int | None = None) -> InstanceInfo:
    return InstanceInfo(
        instance_id=record.instance_id,
        service=record.labels[LABEL_SERVICE],
        revision=record.labels[LABEL_REVISION],
        state=state,
        address=record.address,
        exit_code=exit_code,
        started_at=record.started_at,
    )


async def _wait_for_exit(pid: int, popen: subprocess.Popen[bytes] | None) -> None:
    """Returns once `pid` has exited (it may be a zombie still)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:  # no pidfds on this kernel: poll
        while _alive(pid) if popen is None else popen.poll() is None:
            await asyncio.sleep(_POLL_INTERVAL)
        return
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def on_readable() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(pidfd, on_readable)
    try:
        await readable
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)


def _reap(pid: int, popen: subprocess.Popen[bytes] | None) -> int | None:
    """The exit code of a process that has exited; None when it is not our child."""
    if popen is not None:
        status = popen.wait()  # it has exited: this does not block
    else:
        try:
            reaped, raw = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return None
        if reaped == 0:
            return None
        status = os.waitstatus_to_exitcode(raw)
    return 128 - status if status < 0 else status


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    if pgid <= 1:  # never signal init's or the caller's group by mistake
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _alive(pid: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in "ZX"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) from /proc/<pid>/stat, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split at the last
    # ")"; what follows starts at field 3, and the start time is field 22 (proc(5)).
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
