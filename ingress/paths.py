"""Where tidegate keeps state and sockets, shared by the daemons and the commands.

systemd's ``StateDirectory=``/``RuntimeDirectory=`` come first (their environment variables;
several entries are joined with ":" and the first is ours), then the system paths when run
as root, then the user's XDG directories, so a non-root `tidegate up` works too.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["runtime_root", "state_root"]


def state_root() -> Path:
    """$STATE_DIRECTORY, else /var/lib/tidegate as root, else $XDG_STATE_HOME/tidegate
    (default ~/.local/state/tidegate)."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/tidegate")
    xdg = os.environ.get("XDG_STATE_HOME", "")
    # The XDG base directory spec says relative paths are invalid and must be ignored.
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "tidegate"


def runtime_root() -> Path:
    """$RUNTIME_DIRECTORY, else /run/tidegate as root, else $XDG_RUNTIME_DIR/tidegate
    (default /tmp/tidegate-UID)."""
    systemd = os.environ.get("RUNTIME_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/tidegate")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "tidegate"
    return Path(f"/tmp/tidegate-{os.geteuid()}")
