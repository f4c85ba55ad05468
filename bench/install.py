"""Making sure the benchmark's tools are present: nginx, haproxy and wrk from Debian packages.

Idempotent: nothing is installed when every binary is found. When something is missing and we
run as root, `apt-get install -y` is tried first and `apt-get update` only if that fails (a
stale package index is the usual reason), so a machine with a fresh index is not made to
download one. Without root we stop and print the command to run.

Note: on Debian, installing nginx-light also enables and starts the system nginx service on
port 80. The benchmark never uses it, but it is one more idle process on a shared machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping

__all__ = ["REQUIRED", "ToolsMissing", "ensure_tools", "find_binary"]

# Binary name -> Debian package that provides it.
REQUIRED: Mapping[str, str] = {
    "nginx": "nginx-light",
    "haproxy": "haproxy",
    "wrk": "wrk",
    "taskset": "util-linux",
}

# nginx and haproxy live in /usr/sbin, which is not on a normal user's PATH.
_EXTRA_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# apt can be slow on a busy mirror, but a benchmark must never hang for ever.
_APT_INSTALL_TIMEOUT_S = 600.0
_APT_UPDATE_TIMEOUT_S = 300.0


class ToolsMissing(RuntimeError):
    """The tools are missing and cannot be installed here; the message says what to do."""


def find_binary(name: str) -> str | None:
    """Path of `name` on PATH or in the sbin directories, or None."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(_EXTRA_DIRS)
    return shutil.which(name, path=path)


def _missing(required: Mapping[str, str]) -> dict[str, str]:
    return {binary: pkg for binary, pkg in required.items() if find_binary(binary) is None}


def _apt(args: list[str], timeout_s: float) -> bool:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        done = subprocess.run(["apt-get", *args], env=env, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def ensure_tools(required: Mapping[str, str] = REQUIRED) -> dict[str, str]:
    """Return binary -> path for every required tool, installing the missing ones if root."""
    missing = _missing(required)
    if missing:
        packages = sorted(set(missing.values()))
        command = "apt-get install -y " + " ".join(packages)
        if os.geteuid() != 0:
            raise ToolsMissing(
                f"missing {', '.join(sorted(missing))}; install them with:\n  sudo {command}"
            )
        if shutil.which("apt-get") is None:
            raise ToolsMissing(f"missing {', '.join(sorted(missing))} and no apt-get here")
        print(f"bench: installing {' '.join(packages)}", flush=True)
        if not _apt(["install", "-y", *packages], _APT_INSTALL_TIMEOUT_S):
            _apt(["update"], _APT_UPDATE_TIMEOUT_S)
            _apt(["install", "-y", *packages], _APT_INSTALL_TIMEOUT_S)
        still = _missing(required)
        if still:
            raise ToolsMissing(f"`{command}` did not provide {', '.join(sorted(still))}")
    found = {binary: find_binary(binary) for binary in required}
    return {binary: path for binary, path in found.items() if path is not None}
