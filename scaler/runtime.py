"""The one narrow interface the scaler needs from whatever runs instances.

Owned by its user (the scaler), implemented by `scaler.runtimes.docker` (containers through
the Docker Engine), `scaler.runtimes.process` (local processes: development, machines without
Docker, the demo) and `scaler.runtimes.fake` (in memory, for tests of the scaler's logic).
Every implementation passes the same contract tests (tests/runtime_contract.py).

A runtime knows nothing of service files: the scaler resolves a service into a
:class:`LaunchSpec` (secrets read, PORT chosen) and hands that over. An instance's output
comes back as :class:`LogLine` records from :meth:`Runtime.logs`; the scaler writes them to the
service's app log (:mod:`scaler.logs`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Literal, Protocol

import msgspec

# Labels every instance carries (contract section 3), so `docker ps --filter
# label=tidegate.service=NAME` finds a service's, and a restarted scaler adopts them.
LABEL_SERVICE = "tidegate.service"
LABEL_REVISION = "tidegate.revision"  # the spec hash: which deployment the instance belongs to
LABEL_INSTANCE = "tidegate.instance"
# the port the app listens on inside the instance (the container port in bridge mode, PORT
# with host networking); the address the ingress uses comes from the runtime's own state
LABEL_PORT = "tidegate.port"


class LaunchSpec(msgspec.Struct, frozen=True, kw_only=True):
    """Everything needed to start one instance; secrets already resolved into `env`."""

    service: str
    revision: str
    instance_id: str  # unique per host, e.g. "hello-3f9a2c"
    image: str | None = None  # docker: a local image reference
    command: tuple[str, ...] = ()  # process: argv; docker: overrides the image's CMD
    env: dict[str, str] = {}  # PORT, TIDEGATE_SERVICE, TIDEGATE_INSTANCE included
    port: int = 8080  # bridge mode: the container port; with host networking PORT in env wins
    network_mode: Literal["bridge", "host"] = "bridge"
    networks: tuple[str, ...] = ()  # extra Docker networks to join
    cpu: float = 0.5  # vCPU
    memory: int = 1_000_000_000  # bytes
    workdir: str | None = None  # process: the working directory
    secret_names: tuple[str, ...] = ()  # which env names are secrets: never logged or labelled


InstanceState = Literal["running", "exited"]


class InstanceInfo(msgspec.Struct, frozen=True, kw_only=True):
    """An instance as the runtime sees it now."""

    instance_id: str
    service: str
    revision: str
    state: InstanceState
    address: str | None  # "127.0.0.1:PORT" the ingress can reach, once known
    exit_code: int | None = None
    started_at: float = 0.0  # wall-clock seconds
    error: str | None = None  # why it is not running, when the runtime knows


class RuntimeEvent(msgspec.Struct, frozen=True, kw_only=True):
    """Something happened to an instance outside the scaler's own calls (or because of them)."""

    kind: Literal["exited", "removed"]
    instance_id: str
    service: str
    exit_code: int | None = None


LogStream = Literal["stdout", "stderr", "output"]


class LogLine(msgspec.Struct, frozen=True):
    """One line an instance wrote."""

    stream: LogStream  # "output": stdout and stderr in one, in the order written (process)
    line: str  # without its newline; undecodable bytes replaced
    time: float  # wall-clock seconds: when written (docker), or when read (process)


class LaunchError(Exception):
    """A runtime could not do what was asked; the message says why, for status and logs."""


class Runtime(Protocol):
    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        """Start an instance; returns once the runtime has it running (not yet healthy).

        Raises LaunchError with a clear message when it cannot (no such image, a bad
        command, no free port)."""
        ...

    async def stop(self, instance_id: str, *, grace: float = 10.0) -> None:
        """SIGTERM, up to `grace` seconds, then kill; then remove. Unknown ids are a no-op."""
        ...

    async def list(self) -> list[InstanceInfo]:
        """Every instance this runtime manages (by label, within its scope), running or
        exited. An app that exits at once may be reported exited by start() itself."""
        ...

    async def inspect(self, instance_id: str) -> InstanceInfo | None: ...

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Exits and removals as they happen, until close()."""
        ...

    def logs(self, instance_id: str, since: float | None = None) -> AsyncIterator[LogLine]:
        """The instance's output, line by line as it is written, ending once the instance
        has stopped and everything it wrote has been given (or at close()); nothing for an
        unknown id. ``since`` (wall-clock seconds): only lines written after it, for a
        restarted scaler continuing an adopted instance's output; None: from its start. A
        runtime that cannot date lines (process) continues instead from the position it
        saved for the previous reader of the same instance."""
        ...

    async def close(self) -> None: ...
