"""The Docker runtime: one container per instance, through the Docker Engine API.

:class:`DockerRuntime` implements :class:`scaler.runtime.Runtime` with the docker SDK. Its rules:

- **The SDK blocks, the loop never does.** Every engine call runs in this runtime's own thread
  pool (a stop holds a thread for up to its grace period, so they do not share the loop's
  default executor); the event stream has a thread of its own.
- **Nothing is pulled.** The image must be local; a missing one is a :class:`LaunchError`. The
  scaler decides whether pulling or building is allowed, before it asks for an instance.
- **Labels find everything.** Containers are named ``tidegate-<instance id>`` and carry the
  labels of :mod:`scaler.runtime`; ``list`` and ``events`` select by ``tidegate.service``, so a
  restarted scaler adopts what is running. Optional scope labels narrow that to one scaler's
  containers (two on one host, or tests beside a real deployment). Secrets reach the
  container as environment values only: never in labels, names or the command line
  (``docker inspect`` shows the environment, as it does for any container; the Docker socket
  is root-equivalent anyway).
- **Bridge mode publishes on loopback only**: the container port is bound to 127.0.0.1 on an
  ephemeral host port the engine picks, read back after start, so two instances never race for
  a port and nothing is exposed beyond the host. The ``tidegate.port`` label holds the
  container port there (the host port is known only after the labels are fixed). In host mode
  the instance listens on the host's ``PORT`` directly and the label holds that.
- **Limits as App Runner sets them**: ``nano_cpus`` from the vCPU share, a hard memory limit
  with no extra swap, and ``no-new-privileges``.
- **Events come from the engine's stream**, ``die`` and ``destroy`` only, followed in a thread
  and handed to the loop with ``call_soon_threadsafe``. The subscription asks the engine to
  replay from the moment ``events()`` was called (``since``), so nothing between taking the
  iterator and the thread connecting is lost; after a break it resumes from the last event.
- **Engine errors become LaunchError** with the engine's own explanation, including an engine
  that cannot be reached at all.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors

from scaler.runtime import (
    LABEL_INSTANCE,
    LABEL_PORT,
    LABEL_REVISION,
    LABEL_SERVICE,
    InstanceInfo,
    LaunchError,
    LaunchSpec,
    RuntimeEvent,
)

__all__ = ["DockerRuntime"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

NAME_PREFIX = "tidegate-"  # container name = NAME_PREFIX + instance id
_LOOPBACK = "127.0.0.1"
_MAX_WORKERS = 32  # engine calls at once; a stop holds one for up to its grace period
_RECONNECT_MIN = 0.5  # seconds before re-following the event stream after it broke ...
_RECONNECT_MAX = 10.0  # ... doubling up to this
_CLOSE_JOIN = 5.0  # seconds close() waits for an event thread that was told to stop
_RUNNING = frozenset({"running", "paused", "restarting"})  # Docker's State.Status values
_UNREACHABLE = "cannot reach the Docker engine (is dockerd running, and DOCKER_HOST right?)"


class DockerRuntime:
    """Instances as containers on the local Docker Engine.

    `client_factory` makes a docker SDK client (default: from the environment, as the docker
    CLI does); it is called lazily, once for calls and once per event stream.

    `scope_labels` (default none) are put on every container this runtime starts, and
    ``list``, ``inspect``, ``stop`` and ``events`` see only containers that carry them: two
    scalers on one host (or a test run beside a real deployment) then never adopt or stop
    each other's instances. Without them the runtime manages every tidegate container."""

    def __init__(
        self,
        client_factory: Callable[[], Any] = docker.from_env,
        *,
        scope_labels: Mapping[str, str] | None = None,
    ) -> None:
        self._client_factory = client_factory
        self._scope = dict(scope_labels or {})
        # The engine ANDs label filters: tidegate's own label and every scope label.
        self._label_filter = [LABEL_SERVICE, *(f"{k}={v}" for k, v in self._scope.items())]
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="tidegate-docker")
        self._streams: set[_EventStream] = set()
        self._closed = False

    # -- the Runtime protocol ---------------------------------------------------------------

    async def start(self, spec: LaunchSpec) -> InstanceInfo:
        """Create and start the instance's container; returns it as the engine sees it then."""
        return await self._call(self._start, spec)

    async def stop(self, instance_id: str, *, grace: float = 10.0) -> None:
        """SIGTERM, up to `grace` seconds (rounded up to whole seconds), then SIGKILL; remove."""
        await self._call(self._stop, instance_id, grace)

    async def list(self) -> list[InstanceInfo]:
        """Every container labelled tidegate.service, running or exited."""
        return await self._call(self._list)

    async def inspect(self, instance_id: str) -> InstanceInfo | None:
        """The instance's container now, or None when there is none."""
        return await self._call(self._inspect, instance_id)

    def events(self) -> AsyncIterator[RuntimeEvent]:
        """Exits (``die``) and removals (``destroy``) of tidegate containers, until close().

        Events from the moment of this call on are delivered even if the engine subscription
        is made later (it asks the engine to replay from then), so a caller may take the
        iterator, start instances, and only then begin iterating."""
        if self._closed:
            raise LaunchError("the Docker runtime is closed")
        return self._follow(time.time())

    async def close(self) -> None:
        """End every event iterator and stream thread, wait for calls in flight, close."""
        if self._closed:
            return
        self._closed = True
        streams = list(self._streams)
        for stream in streams:
            stream.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, _join_all, streams)
        await loop.run_in_executor(None, functools.partial(self._executor.shutdown, wait=True))
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- calls, in the thread pool -----------------------------------------------------------

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._closed:
            raise LaunchError("the Docker runtime is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _engine_errors, fn, *args)

    def _docker(self) -> Any:
        """The shared client, made on first use (making it may already talk to the engine)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._client_factory()
            return self._client

    def _start(self, spec: LaunchSpec) -> InstanceInfo:
        if spec.image is None:
            raise LaunchError(f"instance {spec.instance_id}: the docker runtime needs an image")
        client = self._docker()
        try:
            client.images.get(spec.image)
        except docker.errors.ImageNotFound:
            raise LaunchError(
                f"image {spec.image} not found locally (tidegate does not pull it here: "
                "build or pull it first)"
            ) from None
        if spec.network_mode == "host" and spec.networks:
            raise LaunchError(
                f"instance {spec.instance_id}: extra networks {', '.join(spec.networks)} "
                "need bridge mode (a host-network container joins no other network)"
            )
        networks = []
        for name in spec.networks:
            try:
                networks.append(client.networks.get(name))
            except docker.errors.NotFound:
                raise LaunchError(
                    f"network {name} not found (create it with `docker network create {name}`)"
                ) from None

        kwargs = _create_kwargs(spec, self._scope)
        try:
            container = client.containers.create(spec.image, **kwargs)
        except docker.errors.APIError as exc:
            raise LaunchError(
                f"instance {spec.instance_id}: cannot create its container: {_why(exc)}"
            ) from None
        try:
            for network in networks:
                network.connect(container)
            container.start()
            container.reload()
        except BaseException as exc:
            _remove_quietly(container)
            if isinstance(exc, docker.errors.APIError):
                raise LaunchError(
                    f"instance {spec.instance_id}: cannot start its container: {_why(exc)}"
                ) from None
            raise
        return _info(container.attrs)

    def _stop(self, instance_id: str, grace: float) -> None:
        container = self._get(instance_id)
        if container is None:
            return
        try:
            container.stop(timeout=max(0, math.ceil(grace)))
        except docker.errors.NotFound:
            return
        _remove_quietly(container)

    def _list(self) -> builtins.list[InstanceInfo]:  # `list` here is the method above
        containers = self._docker().containers.list(
            all=True, filters={"label": self._label_filter}, ignore_removed=True
        )
        return [_info(c.attrs) for c in containers if LABEL_INSTANCE in (c.labels or {})]

    def _inspect(self, instance_id: str) -> InstanceInfo | None:
        container = self._get(instance_id)
        return None if container is None else _info(container.attrs)

    def _get(self, instance_id: str) -> Any:
        """This instance's container, or None (also for a same-named container not ours)."""
        try:
            container = self._docker().containers.get(NAME_PREFIX + instance_id)
        except docker.errors.NotFound:
            return None
        labels = container.labels or {}
        if labels.get(LABEL_INSTANCE) != instance_id:
            return None
        if any(labels.get(k) != v for k, v in self._scope.items()):
            return None
        return container

    # -- events ------------------------------------------------------------------------------

    async def _follow(self, since: float) -> AsyncIterator[RuntimeEvent]:
        if self._closed:  # closed between events() and the first iteration
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RuntimeEvent | None] = asyncio.Queue()

        def deliver(event: RuntimeEvent | None) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return False
            return True

        stream = _EventStream(self._client_factory, self._label_filter, since, deliver)
        self._streams.add(stream)
        stream.start()
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            stream.close()
            self._streams.discard(stream)


class _EventStream:
    """One engine event subscription, followed in a thread, handed to the loop per event.

    It reconnects when the stream breaks (dockerd restarted), asking the engine to replay from
    the last event seen, and skips the replayed ones it already delivered."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        label_filter: list[str],
        since: float,
        deliver: Callable[[RuntimeEvent | None], bool],
    ) -> None:
        self._client_factory = client_factory
        self._filters = {"label": label_filter, "type": "container", "event": ["die", "destroy"]}
        self._since = f"{since:.9f}"
        self._deliver = deliver
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._client: Any = None
        self._stream: Any = None
        self._last_nano = 0
        self._seen_at_last: set[tuple[str, str]] = set()
        self._thread = threading.Thread(
            target=self._run, name="tidegate-docker-events", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop following: shut the stream's socket so a blocked read returns. Never blocks."""
        with self._lock:
            self._stopping.set()
            stream, client = self._stream, self._client
        if stream is not None:
            try:
                stream.close()
            except Exception:  # already closed, or the socket is gone: either way it ends
                log.debug("closing the event stream", exc_info=True)
        if client is not None:
            client.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        delay = _RECONNECT_MIN
        try:
            while not self._stopping.is_set():
                try:
                    if self._follow_once():
                        delay = _RECONNECT_MIN  # it had worked: start the backoff over
                except Exception as exc:
                    if self._stopping.is_set():
                        break
                    log.warning("Docker event stream failed (%s); retrying in %.1fs", exc, delay)
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, _RECONNECT_MAX)
        finally:
            with self._lock:
                client, self._client, self._stream = self._client, None, None
            if client is not None:
                client.close()
            self._deliver(None)

    def _follow_once(self) -> bool:
        """Follow the stream until it ends; True if it delivered anything."""
        client = self._client_factory()
        with self._lock:
            if self._stopping.is_set():
                client.close()
                return False
            self._client = client
        try:
            stream = client.events(since=self._since, decode=True, filters=self._filters)
            with self._lock:
                if self._stopping.is_set():
                    stream.close()
                    return False
                self._stream = stream
            delivered = False
            for raw in stream:
                event = self._translate(raw)
                if event is not None:
                    if not self._deliver(event):
                        self._stopping.set()
                        break
                    delivered = True
        finally:
            with self._lock:
                self._stream = self._client = None
            client.close()
        return delivered

    def _translate(self, raw: dict[str, Any]) -> RuntimeEvent | None:
        nano = int(raw.get("timeNano") or 0)
        action = str(raw.get("Action") or raw.get("status") or "")
        actor = raw.get("Actor") or {}
        key = (str(actor.get("ID", "")), action)
        if nano < self._last_nano or (nano == self._last_nano and key in self._seen_at_last):
            return None  # replayed after a reconnect: delivered already
        if nano > self._last_nano:
            self._last_nano, self._seen_at_last = nano, set()
            self._since = f"{nano // 1_000_000_000}.{nano % 1_000_000_000:09d}"
        self._seen_at_last.add(key)
        attributes = actor.get("Attributes") or {}
        instance_id, service = attributes.get(LABEL_INSTANCE), attributes.get(LABEL_SERVICE)
        if not instance_id or not service:
            return None
        if action == "die":
            code = attributes.get("exitCode")
            return RuntimeEvent(
                kind="exited",
                instance_id=instance_id,
                service=service,
                exit_code=int(code) if code is not None else None,
            )
        if action == "destroy":
            return RuntimeEvent(kind="removed", instance_id=instance_id, service=service)
        return None


# -- helpers -----------------------------------------------------------------------------------


def _engine_errors(fn: Callable[..., _T], *args: Any) -> _T:
    """Run `fn`, turning what the engine or its socket raised into LaunchError."""
    try:
        return fn(*args)
    except LaunchError:
        raise
    except docker.errors.APIError as exc:
        raise LaunchError(f"Docker engine error: {_why(exc)}") from exc
    except (docker.errors.DockerException, OSError) as exc:
        # OSError covers the HTTP layer's connection errors (requests' are OSErrors too).
        raise LaunchError(f"{_UNREACHABLE}: {exc}") from exc


def _create_kwargs(spec: LaunchSpec, scope: Mapping[str, str]) -> dict[str, Any]:
    """containers.create's arguments for this spec (everything but the image)."""
    port = int(spec.env.get("PORT", spec.port)) if spec.network_mode == "host" else spec.port
    kwargs: dict[str, Any] = {
        "command": list(spec.command) or None,
        "name": NAME_PREFIX + spec.instance_id,
        "labels": {
            **scope,
            LABEL_SERVICE: spec.service,
            LABEL_REVISION: spec.revision,
            LABEL_INSTANCE: spec.instance_id,
            LABEL_PORT: str(port),
        },
        "environment": dict(spec.env),
        "nano_cpus": round(spec.cpu * 1e9),
        "mem_limit": spec.memory,
        "memswap_limit": spec.memory,  # memory is a hard limit: no extra swap on top
        "security_opt": ["no-new-privileges"],
    }
    if spec.network_mode == "host":
        kwargs["network_mode"] = "host"
    else:
        kwargs["ports"] = {f"{spec.port}/tcp": (_LOOPBACK, None)}  # None: the engine picks
    return kwargs


def _info(attrs: dict[str, Any]) -> InstanceInfo:
    """An InstanceInfo from a container's inspect document."""
    labels = attrs["Config"].get("Labels") or {}
    state = attrs.get("State") or {}
    running = state.get("Status") in _RUNNING
    error = state.get("Error") or None
    if state.get("OOMKilled"):
        error = "killed: out of memory"
    elif state.get("Status") == "created":
        error = error or "created but never started"
    return InstanceInfo(
        instance_id=labels.get(LABEL_INSTANCE, ""),
        service=labels.get(LABEL_SERVICE, ""),
        revision=labels.get(LABEL_REVISION, ""),
        state="running" if running else "exited",
        address=_address(attrs, labels) if running else None,
        exit_code=None if running or state.get("Status") == "created" else state.get("ExitCode"),
        started_at=_timestamp(state.get("StartedAt")),
        error=None if running else error,
    )


def _address(attrs: dict[str, Any], labels: dict[str, str]) -> str | None:
    """127.0.0.1:<port> the ingress reaches the instance on: the published port in bridge
    mode, the label's port with host networking."""
    port = labels.get(LABEL_PORT)
    if port is None:
        return None
    if (attrs.get("HostConfig") or {}).get("NetworkMode") == "host":
        return f"{_LOOPBACK}:{port}"
    bindings = ((attrs.get("NetworkSettings") or {}).get("Ports") or {}).get(f"{port}/tcp")
    for binding in bindings or ():
        if binding.get("HostIp") == _LOOPBACK and binding.get("HostPort"):
            return f"{_LOOPBACK}:{binding['HostPort']}"
    return None


def _timestamp(text: str | None) -> float:
    """Docker's RFC 3339 time with nanoseconds as epoch seconds; 0.0 for its zero time."""
    if not text or text.startswith("0001-"):
        return 0.0
    head, _, frac = text.rstrip("Z").partition(".")
    try:
        moment = datetime.fromisoformat(head).replace(tzinfo=UTC)
    except ValueError:
        return 0.0
    return moment.timestamp() + (float(f"0.{frac}") if frac.isdigit() else 0.0)


def _why(exc: docker.errors.APIError) -> str:
    return str(exc.explanation or exc)


def _remove_quietly(container: Any) -> None:
    """Remove a container and its anonymous volumes; gone already, or going, is fine."""
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: a removal is already in progress
            raise


def _join_all(streams: list[_EventStream]) -> None:
    deadline = time.monotonic() + _CLOSE_JOIN
    for stream in streams:
        stream.join(max(0.0, deadline - time.monotonic()))
