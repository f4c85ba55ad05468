"""Test images for the Docker runtime, built locally FROM scratch with the host's busybox.

Nothing is pulled: every image is ``FROM scratch`` plus ``/bin/busybox`` (a static binary) and
a few files, built by the engine from a tar context made here in memory. The legacy builder
(the SDK's default ``/build``) needs no registry for ``FROM scratch``. Each image is tagged
``tidegate-test/<name>:<content hash>``, so it is built once per content and reused by later
runs; changing a script here changes the hash and builds a new one.

The images:

- ``httpd``: ``busybox httpd`` on ``$PORT`` serving ``/www``: ``/`` an index,
  ``/cgi-bin/env`` the environment, ``/cgi-bin/slow?ms=200`` answers after that many
  milliseconds, ``/cgi-bin/crash`` makes the container exit with code 70.
- ``crash``: exits with code 3 at once.
- ``never-listens``: sleeps forever and never listens.

httpd and never-listens run under ``sh`` as PID 1 with traps, because PID 1 in a container gets
only the signals it has a handler for (pid_namespaces(7)): busybox httpd installs none, so as
PID 1 it would sit out SIGTERM for the whole grace period and no CGI could make it exit.
SIGTERM exits 0 at once; SIGUSR1 (what ``/cgi-bin/crash`` sends PID 1) exits 70.

:func:`images_fixture` is the session fixture the Docker tests use: it skips them with the
reason when no engine answers, and removes the containers tests leave behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

BUSYBOX = Path("/bin/busybox")
REPOSITORY = "tidegate-test"
# Every test runtime puts this label on its containers (DockerRuntime's scope_labels), so it
# sees only test containers and cleanup removes only those, never a real deployment's.
TEST_SCOPE = {"tidegate.test": "1"}
SERVICE_PREFIX = "tgtest-"  # the docker tests' service names start so
CRASH_CGI_EXIT = 70  # the httpd container's exit code after /cgi-bin/crash
CRASH_EXIT = 3  # the crash image's exit code

_BB = "/bin/busybox"
_TRAPS = 'trap "exit 0" TERM; trap "exit 70" USR1; '

_CGI_HEAD = f"#!{_BB} sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n"
_HTTPD_FILES = {
    "www/index.html": "tidegate test httpd\n",
    "www/cgi-bin/env": _CGI_HEAD + f"{_BB} env\n",
    "www/cgi-bin/slow": _CGI_HEAD
    + 'ms="${QUERY_STRING#*ms=}"; ms="${ms%%&*}"; [ -n "$ms" ] || ms=0\n'
    + f'{_BB} usleep "$(( ms * 1000 ))"\n'
    + 'echo "slept ${ms}ms"\n',
    "www/cgi-bin/crash": _CGI_HEAD + "echo crashing\n" + f"{_BB} kill -USR1 1\n",
}


def _dockerfile(cmd: str, *, www: bool = False) -> str:
    """A FROM scratch image with busybox, the context's www/ if asked, and `sh -c CMD`."""
    return (
        "FROM scratch\n"
        f"COPY busybox {_BB}\n"
        + ("COPY www /www\n" if www else "")
        + "ENV PORT=8080\n"
        + f"CMD {json.dumps([_BB, 'sh', '-c', cmd])}\n"
    )


_IMAGES: dict[str, tuple[str, dict[str, str]]] = {
    "httpd": (
        _dockerfile(_TRAPS + f'{_BB} httpd -f -p "$PORT" -h /www & wait $!', www=True),
        _HTTPD_FILES,
    ),
    "crash": (_dockerfile(f"exit {CRASH_EXIT}"), {}),
    "never-listens": (_dockerfile(_TRAPS + f"{_BB} sleep 2147483647 & wait $!"), {}),
}


# Hashed with the context: an image built with other options gets another tag.
_BUILD_OPTIONS: dict[str, Any] = {"rm": True, "forcerm": True, "pull": False}


@dataclass(frozen=True)
class TestImages:
    """The tags of the built test images."""

    __test__ = False  # not a test class, whatever its name says

    httpd: str
    crash: str
    never_listens: str


def _context(dockerfile: str, files: dict[str, str], busybox: bytes) -> bytes:
    """A deterministic tar (fixed owners and times) so equal content gives equal bytes."""
    entries: dict[str, tuple[bytes, int]] = {
        "Dockerfile": (dockerfile.encode(), 0o644),
        "busybox": (busybox, 0o755),
    }
    for name, text in files.items():
        entries[name] = (text.encode(), 0o755 if "/cgi-bin/" in name else 0o644)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        dirs = sorted({str(Path(n).parent) for n in entries} - {"."})
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, (data, mode) in sorted(entries.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def build_images(client: Any) -> TestImages:
    """Build (or find, by content hash) every test image; returns their tags."""
    import docker.errors

    busybox = BUSYBOX.read_bytes()
    tags: dict[str, str] = {}
    for name, (dockerfile, files) in _IMAGES.items():
        context = _context(dockerfile, files, busybox)
        digest = hashlib.sha256(context + repr(sorted(_BUILD_OPTIONS.items())).encode())
        tag = f"{REPOSITORY}/{name}:{digest.hexdigest()[:16]}"
        try:
            client.images.get(tag)
        except docker.errors.ImageNotFound:
            client.images.build(
                fileobj=io.BytesIO(context), custom_context=True, tag=tag, **_BUILD_OPTIONS
            )
        tags[name.replace("-", "_")] = tag
    return TestImages(**tags)


def remove_test_containers(client: Any) -> list[str]:
    """Force-remove every tidegate container a test started (TEST_SCOPE); returns their names.

    Only those, so running the tests on a machine that also runs tidegate for real never
    touches its instances."""
    import docker.errors

    (key,) = TEST_SCOPE
    removed = []
    for container in client.containers.list(
        all=True, filters={"label": ["tidegate.service", key]}, ignore_removed=True
    ):
        try:
            container.remove(force=True, v=True)
            removed.append(container.name)
        except docker.errors.NotFound:
            pass
    return removed


def _docker_client() -> Any:
    """A client for the local engine, or skip with why there is none."""
    try:
        import docker
    except ImportError as exc:
        pytest.skip(f"Docker tests need the docker SDK: {exc}")
    if not BUSYBOX.is_file():
        pytest.skip(f"Docker tests build their images from {BUSYBOX}, which is missing")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as exc:  # any reason at all: the tests cannot run here
        pytest.skip(f"Docker is unavailable (no engine, or no permission for its socket): {exc}")
    return client


@pytest.fixture(scope="session", name="images")
def images_fixture() -> Iterator[TestImages]:
    """The test images' tags; skips when Docker is unavailable; removes leftover containers."""
    client = _docker_client()
    try:
        remove_test_containers(client)  # an earlier run that was killed midway
        yield build_images(client)
    finally:
        remove_test_containers(client)
        client.close()
