"""The routing table kept on disk, so a restarted ingress routes at once.

Without it, an ingress restarted under systemd (an upgrade, a crash) knows no service until
the scaler notices the broken subscription and puts them all again: every request in that
window would get a 404, although the instances never stopped. With ``--routes-file`` the
ingress writes its table (services and their instances) after each change, debounced, and
loads it before it starts listening; the scaler's own put then replaces it with the truth.
An instance that went away meanwhile fails its first request fast, is ejected and the
request retried elsewhere (:mod:`ingress.balancer`), until that put arrives.

Writes are atomic (a temporary file renamed over the old one) and private (0600): a crash
mid-write leaves the previous table, never half of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from pathlib import Path

import msgspec

from ingress.messages import ServiceRouting

__all__ = ["RouteStore"]

_log = logging.getLogger(__name__)

_DEBOUNCE = 0.2  # seconds: a burst of instance changes is one write


class RouteStore:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._timer: asyncio.TimerHandle | None = None
        self._snapshot: list[ServiceRouting] | None = None

    def load(self) -> list[ServiceRouting]:
        """The saved table; empty when there is none or it cannot be read (logged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            _log.warning("cannot read the saved routes %s: %s", self.path, exc.strerror)
            return []
        try:
            return msgspec.json.decode(data, type=list[ServiceRouting])
        except msgspec.DecodeError as exc:
            _log.warning("ignoring the saved routes %s: %s", self.path, exc)
            return []

    def save_soon(self, routings: list[ServiceRouting]) -> None:
        """Write ``routings`` within the debounce period (the latest call wins)."""
        self._snapshot = routings
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_DEBOUNCE, self.flush)

    def flush(self) -> None:
        """Write the latest table now (also on shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        routings, self._snapshot = self._snapshot, None
        if routings is None:
            return
        data = msgspec.json.encode(routings)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".routes-", dir=self.path.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            _log.warning("cannot save the routes to %s: %s", self.path, exc)
