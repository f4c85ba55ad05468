"""Unix-socket listeners for the control APIs: private, and safe against a live owner.

Both daemons serve their control API on a unix socket (the ingress's for the scaler, the
scaler's for `tidegate status`/`apply`), and both need the same care taking the path:

- A socket file left by a crashed process is replaced; one a live process answers on is not,
  so a second daemon never steals the first one's socket.
- The socket is mode 0600 before anyone can connect, and its directory is created 0700.
- On close only our own file is removed: if another process has replaced it meanwhile, its
  socket stays.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat

__all__ = ["MAX_SOCKET_PATH_BYTES", "ControlSocketError", "UnixListener"]

_log = logging.getLogger(__name__)

# unix(7): sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


class ControlSocketError(RuntimeError):
    """The control socket's path cannot be taken: in use, not a socket, or too long."""


class UnixListener:
    """Binds a listening unix socket at ``path`` and removes it again on :meth:`unlink`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._socket_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound

    def bind(self) -> socket.socket:
        """A listening, non-blocking socket at the path; ControlSocketError if it is taken."""
        path = self.path
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise ControlSocketError(
                f"control socket path is longer than {MAX_SOCKET_PATH_BYTES} bytes: {path}"
            )
        parent = os.path.dirname(os.path.abspath(path))
        # 0700: the socket's own mode is what guards it, the directory keeps others from even
        # seeing it. An existing directory is left as the operator made it.
        os.makedirs(parent, mode=0o700, exist_ok=True)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(path)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ControlSocketError(
                        f"control socket {path} was created by another process while starting"
                    ) from exc
                raise
            # chmod after bind() and before listen(), not the umask trick: the umask is
            # process-wide, so narrowing it here would also narrow (or race with) files that
            # other threads create meanwhile. Until listen() every connect() to the socket is
            # refused, so no client can get in while the mode is still the default.
            os.chmod(path, 0o600)
            st = os.stat(path)
            self._socket_id = (st.st_dev, st.st_ino)
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self.unlink()
            raise
        return sock

    def unlink(self) -> None:
        """Remove the socket file, unless another process has replaced it since we bound."""
        if self._socket_id is None:
            return
        socket_id, self._socket_id = self._socket_id, None
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == socket_id:
            os.unlink(self.path)


def _remove_stale_socket(path: str) -> None:
    """Unlink a socket file nobody listens on; ControlSocketError if someone does.

    A non-blocking connect answers at once: ECONNREFUSED means the file outlived its
    process; success, or EAGAIN (a live server with a full backlog), means it is in use.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlSocketError(f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        code = probe.connect_ex(path)
    if code == errno.ECONNREFUSED:
        _log.info("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    elif code == errno.ENOENT:
        return
    elif code in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise ControlSocketError(f"another process is listening on the control socket {path}")
    else:
        raise ControlSocketError(f"cannot probe the control socket {path}: {os.strerror(code)}")
