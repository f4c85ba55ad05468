"""Running under systemd: readiness and status notifications, the watchdog, socket activation.

The three protocols are small and documented, so they are implemented here directly rather
than through libsystemd or a binding (no new dependency):

- **sd_notify(3)**: one ``KEY=VALUE`` line per field, sent as one datagram to the unix socket
  named by ``NOTIFY_SOCKET`` (an absolute path, or ``@name`` for the abstract namespace).
  ``READY=1`` once serving, ``STATUS=`` for ``systemctl status``, ``STOPPING=1`` when draining,
  ``WATCHDOG=1`` as the keep-alive. Sending never blocks and never raises: a daemon must not
  fail, or stall its event loop, because its supervisor is not listening.
- **sd_watchdog_enabled(3)**: ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, if set, must be ours)
  gives the timeout; we ping at half of it, as the man page advises. The pings are scheduled
  on the event loop itself (:func:`start_watchdog`), so a loop stuck in a callback stops
  pinging and systemd restarts the process: that is the failure worth detecting.
- **sd_listen_fds(3)**: ``LISTEN_PID`` must be our pid, ``LISTEN_FDS`` descriptors start at 3,
  ``LISTEN_FDNAMES`` names them (``:``-separated; systemd defaults a socket's name to its unit
  name). :func:`ingress_listeners` maps them for the ingress: fds named ``https`` are TLS
  listeners, every other name plain HTTP.

As libsystemd does with ``unset_environment``, every variable read here is removed from
``os.environ``: no process started later (a helper, a hook, an instance of a runtime that
passes the environment on; the process runtime already passes only an allowlist) may inherit
them. A child that saw ``NOTIFY_SOCKET`` could report READY=1 or STOPPING=1 in our name
(systemd accepts it with ``NotifyAccess=all``), one that saw ``WATCHDOG_USEC`` would ping a
watchdog that is not its own, and one that saw ``LISTEN_FDS`` without the descriptors would
take unrelated files at fd 3 and up for listeners.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping, MutableMapping
from typing import NamedTuple

__all__ = [
    "SD_LISTEN_FDS_START",
    "Listeners",
    "Notifier",
    "Ticker",
    "activated_listeners",
    "ingress_listeners",
    "listen_fds",
    "notify_address",
    "start_watchdog",
    "watchdog_interval",
]

log = logging.getLogger("tidegate.systemd")

SD_LISTEN_FDS_START = 3  # the first passed descriptor (sd-daemon.h)
UNKNOWN_NAME = "unknown"  # sd_listen_fds_with_names(3): the name of an fd LISTEN_FDNAMES omits
HTTPS_NAME = "https"  # FileDescriptorName= of a socket the ingress serves with TLS


# -- sd_notify ----------------------------------------------------------------------------------


def notify_address(value: str) -> str | None:
    """The ``sendto`` address for a ``NOTIFY_SOCKET`` value; None if it is empty.

    ``@name`` is the abstract namespace (a leading NUL byte on the wire). systemd also accepts
    ``vsock:CID:PORT`` (a VM's host), which tidegate has no use for: ValueError, as for a
    relative path.
    """
    if not value:
        return None
    if value.startswith("@"):
        if len(value) == 1:
            raise ValueError("NOTIFY_SOCKET: '@' names no abstract socket")
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(f"NOTIFY_SOCKET: not an absolute path or @abstract name: {value!r}")


class Notifier:
    """Sends sd_notify(3) messages; every method is a no-op when not run by systemd.

    Make it with :meth:`from_environ` as early as possible, before any child process starts.
    ``watchdog_timeout`` is the watchdog's timeout in seconds, None when systemd watches none.
    """

    def __init__(self, address: str | None, *, watchdog_timeout: float | None = None) -> None:
        self.address = address
        self.watchdog_timeout = watchdog_timeout
        self._sock: socket.socket | None = None
        self._warned = False

    @classmethod
    def from_environ(
        cls, environ: MutableMapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (default: this
        process's environment and pid), which are then removed from ``environ``.

        A value systemd would not have written is logged and ignored rather than fatal: the
        ingress serves without notifications sooner than not at all.
        """
        env = os.environ if environ is None else environ
        try:
            address = notify_address(env.pop("NOTIFY_SOCKET", ""))
        except ValueError as exc:
            log.warning("not notifying systemd: %s", exc)
            address = None
        try:
            timeout = watchdog_interval(env, os.getpid() if pid is None else pid)
        except ValueError as exc:
            log.warning("no systemd watchdog: %s", exc)
            timeout = None
        return cls(address, watchdog_timeout=timeout if address is not None else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, text: str) -> bool:
        """One datagram of ``KEY=VALUE`` lines; False if not sent (no socket, or it failed).

        Non-blocking: a full receive queue drops the message rather than stall the loop.
        """
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self.address)
        except OSError as exc:
            if not self._warned:  # once: a watchdog would repeat it twice per timeout
                self._warned = True
                where = self.address.replace("\0", "@", 1)
                log.warning("cannot notify systemd at %s: %s", where, exc)
            return False
        return True

    def notify(self, **fields: str | int) -> bool:
        """``notify(READY=1, STATUS="...")``; newlines in a value become spaces (one line
        per field is the protocol)."""
        lines = (f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        return self.send("\n".join(lines))

    def ready(self, status: str | None = None) -> bool:
        """Listening with the configuration loaded: systemd starts what is ordered after us."""
        return self.notify(READY=1, STATUS=status) if status else self.notify(READY=1)

    def status(self, text: str) -> bool:
        """What ``systemctl status`` shows on its ``Status:`` line."""
        return self.notify(STATUS=text)

    def stopping(self, status: str | None = None) -> bool:
        """Shutting down (draining) of our own accord, not failing."""
        return self.notify(STOPPING=1, STATUS=status) if status else self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# -- the watchdog -------------------------------------------------------------------------------


def watchdog_interval(environ: MutableMapping[str, str], pid: int) -> float | None:
    """The watchdog timeout in seconds from ``WATCHDOG_USEC``, or None when there is none or
    ``WATCHDOG_PID`` names another process; both variables are removed from ``environ``.

    ValueError for what sd_watchdog_enabled(3) rejects as -EINVAL: a value that is not a
    positive number of microseconds, or a ``WATCHDOG_PID`` that is not a pid.
    """
    usec = environ.pop("WATCHDOG_USEC", None)
    owner = environ.pop("WATCHDOG_PID", None)
    if usec is None:
        return None
    micros = _unsigned("WATCHDOG_USEC", usec)
    if micros == 0:
        raise ValueError("WATCHDOG_USEC: must be > 0")
    if owner is not None and _unsigned("WATCHDOG_PID", owner) != pid:
        return None  # meant for another process (our parent, say)
    return micros / 1_000_000


class Ticker:
    """Calls ``fn`` every ``interval`` seconds from ``loop`` until :meth:`cancel`.

    One timer handle, re-armed before ``fn`` runs so that an exception in ``fn`` (reported by
    the loop's exception handler) does not end the ticking.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, interval: float, fn: Callable[[], object]
    ) -> None:
        self._loop = loop
        self._interval = interval
        self._fn = fn
        self._handle: asyncio.TimerHandle | None = loop.call_later(interval, self._tick)

    @property
    def interval(self) -> float:
        return self._interval

    def _tick(self) -> None:
        self._handle = self._loop.call_later(self._interval, self._tick)
        self._fn()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


def start_watchdog(loop: asyncio.AbstractEventLoop, notifier: Notifier) -> Ticker | None:
    """Ping now and every half ``notifier.watchdog_timeout`` from ``loop``; None when systemd
    watches nothing. Cancel the ticker when the loop is about to stop."""
    timeout = notifier.watchdog_timeout
    if timeout is None or not notifier.enabled:
        return None
    notifier.watchdog()
    return Ticker(loop, timeout / 2, notifier.watchdog)


# -- socket activation --------------------------------------------------------------------------


def listen_fds(
    environ: MutableMapping[str, str], pid: int, *, start: int = SD_LISTEN_FDS_START
) -> dict[str, list[socket.socket]]:
    """The listening sockets systemd passed, by name; empty when not socket-activated.

    Follows sd_listen_fds_with_names(3): nothing is ours unless ``LISTEN_PID`` is ``pid``;
    ``LISTEN_FDS`` descriptors from ``start`` (3, or another base in tests); names from
    ``LISTEN_FDNAMES``, ``unknown`` where it gives none. The three variables are removed from
    ``environ``. Each descriptor becomes a non-blocking socket object (family and type read
    from the descriptor) that is not inherited across exec (FD_CLOEXEC).

    ValueError, naming the variable or descriptor, for a value that is not a number, a names
    count that differs from ``LISTEN_FDS``, or a descriptor that is not a listening stream
    socket; the descriptors are then left as they were.
    """
    owner = environ.pop("LISTEN_PID", None)
    count_text = environ.pop("LISTEN_FDS", None)
    names_text = environ.pop("LISTEN_FDNAMES", None)
    if owner is None or count_text is None:
        return {}
    if _unsigned("LISTEN_PID", owner) != pid:
        return {}  # passed to another process (we inherited its environment)
    count = _unsigned("LISTEN_FDS", count_text)
    if names_text is None:
        names = [UNKNOWN_NAME] * count
    else:
        names = [name or UNKNOWN_NAME for name in names_text.split(":")] if count else []
        if len(names) != count:
            raise ValueError(
                f"LISTEN_FDNAMES: {len(names)} name(s) for LISTEN_FDS={count} descriptor(s)"
            )
    made: list[socket.socket] = []
    try:
        for fd in range(start, start + count):
            made.append(_listening_socket(fd))
    except ValueError:
        for sock in made:
            sock.detach()  # the descriptor stays open, as it was handed in
        raise
    named: dict[str, list[socket.socket]] = {}
    for name, sock in zip(names, made, strict=True):
        os.set_inheritable(sock.fileno(), False)
        sock.setblocking(False)
        named.setdefault(name, []).append(sock)
    return named


def _listening_socket(fd: int) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ValueError(f"LISTEN_FDS: fd {fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ValueError(f"LISTEN_FDS: fd {fd} is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM:
            raise ValueError(f"LISTEN_FDS: fd {fd} is not a stream socket ({sock.type.name})")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"LISTEN_FDS: fd {fd} is not listening")
    except BaseException:
        sock.detach()
        raise
    return sock


def _unsigned(variable: str, text: str) -> int:
    """A decimal integer >= 0 as systemd writes it; ValueError naming the variable."""
    if not text.isascii() or not text.isdigit():
        raise ValueError(f"{variable}: not a non-negative integer: {text!r}")
    return int(text)


class Listeners(NamedTuple):
    """The ingress's listeners from socket activation."""

    http: list[socket.socket]
    https: list[socket.socket]


def ingress_listeners(named: Mapping[str, list[socket.socket]]) -> Listeners | None:
    """Sockets named ``https`` serve TLS, any other name (``http``, ``unknown``, the socket
    unit's name) plain HTTP; None if there are none. The metrics listener is not activated:
    an fd named ``metrics`` is refused rather than silently served as proxy traffic.

    ValueError for a socket that is not TCP (IPv4 or IPv6).
    """
    if not named:
        return None
    if "metrics" in named:
        raise ValueError(
            "LISTEN_FDNAMES: the metrics listener is not socket-activated; "
            "bind it with --metrics-listen"
        )
    http: list[socket.socket] = []
    https: list[socket.socket] = []
    for name, socks in named.items():
        for sock in socks:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError(
                    f"LISTEN_FDS: fd {sock.fileno()} ({name}) is {sock.family.name}, "
                    "not a TCP socket"
                )
        (https if name == HTTPS_NAME else http).extend(socks)
    return Listeners(http, https)


def activated_listeners(
    environ: MutableMapping[str, str] | None = None, pid: int | None = None
) -> Listeners | None:
    """:func:`ingress_listeners` of :func:`listen_fds` for this process (default:
    ``os.environ`` and ``os.getpid()``); None when not socket-activated."""
    env = os.environ if environ is None else environ
    return ingress_listeners(listen_fds(env, os.getpid() if pid is None else pid))
