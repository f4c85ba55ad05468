"""The systemd units in systemd/: `systemd-analyze verify` passes on each, each service holds
its exposure target under `systemd-analyze security --offline=true` (neither needs systemd
as PID 1), the directives the design rests on are there, and sysusers.d/tmpfiles.d make the
user and /run/tidegate."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ingress.systemd import HTTPS_NAME
from tidegate.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
INSTALLED_BINARY = "/opt/tidegate/venv/bin/tidegate"  # where the README installs it
INGRESS = "tidegate-ingress.service"
SCALER = "tidegate-scaler.service"
HTTP_SOCKET = "tidegate-ingress.socket"
HTTPS_SOCKET = "tidegate-ingress-tls.socket"
UNITS = [INGRESS, HTTP_SOCKET, HTTPS_SOCKET, SCALER]
# The targets; the measured scores are in README.md ("Installing as a systemd service").
EXPOSURE_TARGETS = {INGRESS: 2.0, SCALER: 5.0}

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian: apt-get install systemd)"
)
# dockerd's unit, standing in for the real one on hosts without Docker (see installed_units)
_DOCKER_STUB = """\
[Unit]
Description=stand-in for dockerd's unit, for systemd-analyze verify

[Service]
ExecStart=/bin/true
"""


def _directives(unit: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given, in order (systemd keys may repeat); comments
    and blank lines skipped. Enough of systemd.syntax(7) for these files: no line
    continuations, no quoting across lines."""
    found: dict[str, list[str]] = {}
    section = ""
    for line in (SYSTEMD / unit).read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


def _one(unit: str, key: str) -> str:
    values = _directives(unit).get(key, [])
    assert len(values) == 1, f"{unit}: {key}: {values}"
    return values[0]


@pytest.fixture
def installed_units(tmp_path: Path) -> Path:
    """The units copied to a directory of their own, as systemd-analyze needs them: the
    ExecStart binary must exist, so it is this checkout's `tidegate` instead of the one
    under /opt; and docker.service (Requires=) must be found, so a stub stands in for it
    (a host running these tests need not have Docker; dockerd's unit is not under test).
    systemd-analyze looks for units next to the files it is given first."""
    binary = Path(sys.executable).parent / "tidegate"
    if not binary.exists():
        found = shutil.which("tidegate")
        assert found, "no tidegate console script: pip install -e . first"
        binary = Path(found)
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text()
        (tmp_path / unit).write_text(text.replace(INSTALLED_BINARY, str(binary)))
    (tmp_path / "docker.service").write_text(_DOCKER_STUB)
    return tmp_path


@needs_analyze
def test_verify(installed_units: Path) -> None:
    """`systemd-analyze verify` accepts every unit, with no warning about any of them:
    it exits 0 on unknown keys and unparsable values, so its output is checked too."""
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "verify", "--man=no", *(str(installed_units / u) for u in UNITS)],
        capture_output=True,
        text=True,
        cwd=installed_units,
        timeout=60,
    )
    output = result.stdout + result.stderr
    ours = [line for line in output.splitlines() if "tidegate" in line or "docker" in line]
    assert result.returncode == 0, output
    assert ours == [], output


def _exposure(unit_file: Path) -> float:
    assert ANALYZE is not None
    result = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit_file)],
        capture_output=True,
        text=True,
        cwd=unit_file.parent,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", sorted(EXPOSURE_TARGETS))
def test_exposure(installed_units: Path, unit: str) -> None:
    """`systemd-analyze security --offline=true` rates each service at or under its target
    (ingress 2.0, scaler 5.0); it does not know that the docker group is root-equivalent."""
    exposure = _exposure(installed_units / unit)
    print(f"{unit}: exposure {exposure}")
    assert exposure <= EXPOSURE_TARGETS[unit]


def test_sockets_pass_named_listeners() -> None:
    """Port 80 comes as fds named "http" and port 443 as "https" (what ingress/systemd.py
    serves with TLS), one name per unit because FileDescriptorName= names a whole unit,
    and both are the ingress's, which takes both."""
    for unit, port, name in ((HTTP_SOCKET, "80", "http"), (HTTPS_SOCKET, "443", HTTPS_NAME)):
        assert _one(unit, "Socket.ListenStream") == port
        assert _one(unit, "Socket.FileDescriptorName") == name
        assert _one(unit, "Socket.Service") == INGRESS
        assert _one(unit, "Install.WantedBy") == "sockets.target"
    assert _one(INGRESS, "Service.Sockets").split() == [HTTP_SOCKET, HTTPS_SOCKET]


@pytest.mark.parametrize(
    ("unit", "command", "config"),
    [
        pytest.param(INGRESS, "ingress", "/etc/tidegate/ingress.yaml", id="ingress"),
        pytest.param(SCALER, "scaler", "/etc/tidegate/scaler.yaml", id="scaler"),
    ],
)
def test_exec_start(unit: str, command: str, config: str) -> None:
    """Each service runs the installed tidegate with its config file, a command line
    tidegate accepts; both are Type=notify, restart on failure but not on a usage error
    (exit 2), and reload with SIGHUP."""
    argv = shlex.split(_one(unit, "Service.ExecStart"))
    assert argv == [INSTALLED_BINARY, command, "--config", config]
    args = build_parser().parse_args(argv[1:])
    assert args.config == config
    assert _one(unit, "Service.Type") == "notify"
    assert _one(unit, "Service.NotifyAccess") == "main"
    assert _one(unit, "Service.Restart") == "on-failure"
    assert _one(unit, "Service.RestartPreventExitStatus") == "2"
    assert _one(unit, "Service.ExecReload") == "/bin/kill -HUP $MAINPID"


# Hardening both services share (issue item 5); the per-unit differences are tested below.
_COMMON = {
    "User": "tidegate",
    "Group": "tidegate",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "RestrictNamespaces": "yes",
    "RestrictSUIDSGID": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "UMask": "0077",
    "ReadWritePaths": "/run/tidegate",
    "Environment": "RUNTIME_DIRECTORY=/run/tidegate",
    "StateDirectory": "tidegate",
}


@pytest.mark.parametrize("unit", [INGRESS, SCALER])
def test_hardening(unit: str) -> None:
    """Both services: the tidegate user, no capability, a read-only system with
    /run/tidegate and the state directory writable, @system-service system calls only, and
    no RuntimeDirectory= (the two share /run/tidegate, which tmpfiles.d makes)."""
    directives = _directives(unit)
    for key, value in _COMMON.items():
        assert directives.get(f"Service.{key}") == [value], key
    assert directives["Service.SystemCallFilter"][0] == "@system-service"
    assert "Service.RuntimeDirectory" not in directives
    assert "Service.KillMode" not in directives  # control-group: see the scaler's comment


def test_ingress_specifics() -> None:
    """The ingress: a private user namespace, no supplementary group (no Docker socket), and
    a watchdog it pings at half the period."""
    directives = _directives(INGRESS)
    assert directives["Service.PrivateUsers"] == ["yes"]
    assert "Service.SupplementaryGroups" not in directives
    assert directives["Service.WatchdogSec"] == ["30s"]


def test_scaler_specifics() -> None:
    """The scaler: after and requiring dockerd, the docker group for its socket and no
    other access (no private user namespace, which would unmap that group), localhost only."""
    directives = _directives(SCALER)
    assert "docker.service" in directives["Unit.Requires"][0].split()
    assert {"docker.service", INGRESS} <= set(directives["Unit.After"][0].split())
    assert directives["Unit.Wants"] == [INGRESS]
    assert directives["Service.SupplementaryGroups"] == ["docker"]
    assert directives["Service.PrivateUsers"] == ["no"]
    assert directives["Service.IPAddressAllow"] == ["localhost"]
    assert directives["Service.IPAddressDeny"] == ["any"]


@pytest.mark.skipif(
    shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
    reason="systemd-sysusers/systemd-tmpfiles are not installed (Debian: apt-get install systemd)",
)
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles needs root to chown")
def test_sysusers_and_tmpfiles(tmp_path: Path) -> None:
    """In an empty root, sysusers.d makes a system user tidegate with no login shell, and
    tmpfiles.d then makes /run/tidegate, 0750, owned by it."""
    for kind in ("sysusers.d", "tmpfiles.d"):  # where the README installs them
        target = tmp_path / "etc" / kind
        target.mkdir(parents=True)
        shutil.copy(SYSTEMD / kind / "tidegate.conf", target / "tidegate.conf")
    for command in ("systemd-sysusers", "systemd-tmpfiles --create"):
        result = subprocess.run(
            [*command.split(), f"--root={tmp_path}"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    users = {line.split(":")[0]: line.split(":") for line in passwd}
    _, _, uid, gid, _, home, shell = users["tidegate"]
    assert int(uid) < 1000 and home == "/var/lib/tidegate" and shell.endswith("nologin")
    run = (tmp_path / "run" / "tidegate").stat()
    assert (run.st_uid, run.st_gid) == (int(uid), int(gid))
    assert run.st_mode & 0o7777 == 0o750
