"""Where the daemons keep sockets: systemd's RuntimeDirectory=, then root's /run, then XDG.
(The state directory's order is tested through ingress.tls.default_state_dir.)"""

from __future__ import annotations

import os

import pytest

from ingress.cli import default_control_socket
from ingress.paths import runtime_root
from scaler.api import default_scaler_socket


@pytest.mark.parametrize(
    ("env", "euid", "expected"),
    [
        pytest.param(
            {"RUNTIME_DIRECTORY": "/run/tg:/run/other", "XDG_RUNTIME_DIR": "/x"},
            1000,
            "/run/tg",
            id="systemd-first-entry",
        ),
        pytest.param({"XDG_RUNTIME_DIR": "/x"}, 0, "/run/tidegate", id="root"),
        pytest.param(
            {"XDG_RUNTIME_DIR": "/run/user/1000"}, 1000, "/run/user/1000/tidegate", id="xdg"
        ),
        pytest.param({"XDG_RUNTIME_DIR": "rel"}, 1000, "/tmp/tidegate-1000", id="xdg-relative"),
        pytest.param({}, 1000, "/tmp/tidegate-1000", id="none"),
    ],
)
def test_runtime_root(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], euid: int, expected: str
) -> None:
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    assert str(runtime_root()) == expected
    assert default_control_socket() == f"{expected}/ingress.sock"
    assert default_scaler_socket() == f"{expected}/scaler.sock"
