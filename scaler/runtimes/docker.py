"""The Docker runtime: one container per instance, through the Docker Engine API.

:class:`DockerRuntime` implements :class:`scaler.runtime.Runtime` with the docker SDK. Its rules:

- **The SDK blocks, the loop never does.** Every engine call runs in this runtime's own thread
  pool (a stop holds a thread for up to its grace period, so they do not share the loop's
  default executor); the event stream has a thread of its own.
- **Nothing is pulled.** The image must be local; a missing one is a :class:`LaunchError`. The
  scaler decides whether pulling or building is allowed, before it asks for an instance.
  :meth:`DockerRuntime.build` never pulls either: the engine's builder fetches a missing base
  image even when told not to pull, so every image the Dockerfile names (``FROM``, ``COPY
  --from``) is looked up locally first and a missing one fails the build before it starts.
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
- **Output is followed per container** (:meth:`DockerRuntime.logs`), in a thread of its own
  like the event stream: the engine's log stream with timestamps, its frames demultiplexed
  into stdout and stderr (the SDK's ``logs()`` drops which stream a frame came from, so the
  frames are read here), ending when the container stops. ``since`` resumes after a
  restart from the last line collected; a broken stream of a running container is followed
  again from the last line seen, skipping what was delivered.
- **Engine errors become LaunchError** with the engine's own explanation, including an engine
  that cannot be reached at all.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import logging
import math
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, BinaryIO, TypeVar

import docker
import docker.errors
from docker.types import CancellableStream

from scaler.logs import LineSplitter
from scaler.runtime import (
    LABEL_INSTANCE,
    LABEL_PORT,
    LABEL_REVISION,
    LABEL_SERVICE,
    InstanceInfo,
    LaunchError,
    LaunchSpec,
    LogLine,
    LogStream,
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
_BUILD_TAIL = 5  # lines of build output a failed build's LaunchError quotes
_BUILD_LINE_MAX = 300  # characters of one quoted build output line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # the builder colours a step's stderr red
_FRAME_HEADER = struct.Struct(">BxxxL")  # the log stream's frames: stream id, 3 zeros, length
_FRAME_STREAMS: dict[int, LogStream] = {1: "stdout", 2: "stderr"}


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
        self._streams: set[_EventStream | _LogFollower] = set()
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

    def logs(self, instance_id: str, since: float | None = None) -> AsyncIterator[LogLine]:
        """The container's stdout and stderr lines (dated by the engine) after ``since``, or
        all of them, as they come, until the container stops or close()."""
        return self._follow_logs(instance_id, since)

    # -- images ------------------------------------------------------------------------------

    async def build(
        self,
        *,
        context: str,
        dockerfile: str,
        tag: str,
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Build the directory `context` with `dockerfile` (a path inside it, or an absolute
        one) into an image tagged `tag` and carrying `labels`; returns its id ("sha256:...").

        Nothing is pulled: every image the Dockerfile builds on must be on this host already.
        The engine caches each step, so building an unchanged context again gives the same id.
        A missing context or Dockerfile, a missing base image, a failing step or an engine that
        cannot be reached raises :class:`LaunchError` saying why, with the end of the build's
        output when there is one. Only ``.dockerignore`` decides what of `context` is sent.
        """
        return await self._call(self._build, context, dockerfile, tag, dict(labels or {}))

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
            # create never pulls (only the SDK's run() does), and says so when the image is
            # missing: no separate look-up, which would cost every cold start an engine call
            container = client.containers.create(spec.image, **kwargs)
        except docker.errors.ImageNotFound:
            raise LaunchError(
                f"image {spec.image} not found locally (tidegate does not pull it here: "
                "build or pull it first)"
            ) from None
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

    def _build(self, context: str, dockerfile: str, tag: str, labels: dict[str, str]) -> str:
        what = f"cannot build image {tag} from {context}"
        if not os.path.isdir(context):
            why = "is not a directory" if os.path.exists(context) else "does not exist"
            raise LaunchError(f"{what}: the build context {why}")
        path = os.path.join(context, dockerfile)  # an absolute dockerfile stays as it is
        try:
            text = _read_text(path)
        except FileNotFoundError:
            raise LaunchError(f"{what}: there is no Dockerfile {dockerfile} in it") from None
        except OSError as exc:
            raise LaunchError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
        client = self._docker()
        for line, ref in _external_images(text):
            try:
                client.images.get(ref)
            except docker.errors.ImageNotFound:
                raise LaunchError(
                    f"{what}: image {ref} ({dockerfile} line {line}) is not on this host, and "
                    "tidegate never pulls: pull or build it first"
                ) from None
            except docker.errors.APIError as exc:  # e.g. not a valid reference at all
                raise LaunchError(f"{what}: {dockerfile} line {line}: {_why(exc)}") from None
        log.info("building image %s from %s (%s)", tag, context, dockerfile)
        output = _BuildOutput()
        try:
            stream = client.api.build(
                path=context,
                dockerfile=dockerfile,
                tag=tag,
                labels=labels or None,
                pull=False,
                rm=True,
                forcerm=True,
                decode=True,
                timeout=None,  # a step may run for long without output; no read timeout
            )
            output.read(stream)
        except docker.errors.APIError as exc:
            raise LaunchError(output.failure(what, _why(exc))) from None
        except docker.errors.DockerException as exc:  # the SDK refused an argument
            raise LaunchError(f"{what}: {exc}") from None
        except OSError as exc:
            if exc.filename is None:
                raise  # the engine's socket: _engine_errors says it cannot be reached
            # the SDK reads the context into a tar before it sends anything
            raise LaunchError(f"{what}: cannot read the context: {exc}") from None
        if output.error is not None:
            raise LaunchError(output.failure(what, output.error))
        image_id = output.image_id
        if image_id is None and output.built is not None:  # no aux record: an older engine
            image_id = str(client.images.get(output.built).id)
        if image_id is None:
            raise LaunchError(output.failure(what, "the engine reported no image"))
        log.info("built image %s: %s", tag, image_id)
        return image_id

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

    async def _follow_logs(self, instance_id: str, since: float | None) -> AsyncIterator[LogLine]:
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[LogLine] | None] = asyncio.Queue()

        def deliver(lines: list[LogLine] | None) -> bool:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, lines)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                return False
            return True

        follower = _LogFollower(self._client_factory, instance_id, self._scope, since, deliver)
        self._streams.add(follower)
        follower.start()
        try:
            while (lines := await queue.get()) is not None:
                for line in lines:
                    yield line
        finally:
            follower.close()
            self._streams.discard(follower)


class _Follower:
    """An engine stream followed in a thread of its own, handed to the loop: the plumbing the
    event and log streams share. :meth:`close` shuts the stream's socket so a blocked read
    returns; a stream that breaks is followed again with a doubling back-off.

    Subclasses set ``_client``/``_stream`` under ``_lock`` while they follow (so close() can
    reach them) and implement :meth:`_follow_once`, :meth:`_describe` and :meth:`_finish`."""

    def __init__(self, client_factory: Callable[[], Any], thread_name: str) -> None:
        self._client_factory = client_factory
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._client: Any = None
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

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
                log.debug("closing %s", self._describe(), exc_info=True)
        if client is not None:
            client.close()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _follow_once(self) -> bool | None:
        """Follow the stream until it ends: True to follow again soon (it worked), False to
        follow again after the back-off, None when there is nothing more to follow."""
        raise NotImplementedError

    def _describe(self) -> str:
        raise NotImplementedError

    def _finish(self) -> None:
        """In the thread, once it stops following."""

    def _run(self) -> None:
        delay = _RECONNECT_MIN
        try:
            while not self._stopping.is_set():
                try:
                    again = self._follow_once()
                    if again is None:
                        break
                    if again:
                        delay = _RECONNECT_MIN  # it had worked: start the back-off over
                except Exception as exc:
                    if self._stopping.is_set():
                        break
                    log.warning(
                        "following %s failed (%s); retrying in %.1fs", self._describe(), exc, delay
                    )
                if self._stopping.wait(delay):
                    break
                delay = min(delay * 2, _RECONNECT_MAX)
        finally:
            with self._lock:
                client, self._client, self._stream = self._client, None, None
            if client is not None:
                client.close()
            self._finish()


class _LogFollower(_Follower):
    """One container's log stream, followed in a thread, handed to the loop per frame.

    It ends when the stream ends and the container no longer runs (or is gone). A stream
    that breaks while the container runs (dockerd restarted) is followed again from the last
    line's time, and lines at or before it are skipped: the engine's ``since`` includes it
    (so would an unseen line of that same instant, the one loss this can cause)."""

    def __init__(
        self,
        client_factory: Callable[[], Any],
        instance_id: str,
        scope: Mapping[str, str],
        since: float | None,
        deliver: Callable[[list[LogLine] | None], bool],
    ) -> None:
        super().__init__(client_factory, f"tidegate-docker-logs-{instance_id}")
        self._instance_id = instance_id
        self._scope = scope
        self._since = since  # lines at or before this are not delivered
        self._last: float | None = None  # the time of the last line delivered
        self._deliver = deliver
        self._splitters: dict[LogStream, LineSplitter] = {}

    def _describe(self) -> str:
        return f"the output of {self._instance_id}"

    def _finish(self) -> None:
        rest = [
            LogLine(stream, text, time.time())
            for stream, splitter in self._splitters.items()
            for text in splitter.flush()
        ]
        if rest and not self._stopping.is_set():
            self._deliver(rest)
        self._deliver(None)

    def _follow_once(self) -> bool | None:
        # again while the container runs; it stopped, or is gone: done
        return True if self._follow_container() else None

    def _follow_container(self) -> bool:
        """Follow the stream until it ends; True if the container still runs (follow again)."""
        if self._last is not None:  # again, after a break: the engine replays from since on
            self._since = self._last
        client = self._client_factory()
        with self._lock:
            if self._stopping.is_set():
                client.close()
                return False
            self._client = client
        try:
            try:
                container = client.containers.get(NAME_PREFIX + self._instance_id)
            except docker.errors.NotFound:
                return False
            labels = container.labels or {}
            if labels.get(LABEL_INSTANCE) != self._instance_id or any(
                labels.get(k) != v for k, v in self._scope.items()
            ):
                return False  # a same-named container that is not ours
            stream = self._open(client.api, container.id)
            with self._lock:
                if self._stopping.is_set():
                    stream.close()
                    return False
                self._stream = stream
            for stream_id, payload in stream:
                lines = self._take(stream_id, payload)
                if lines and not self._deliver(lines):
                    self._stopping.set()
                    return False
            if self._stopping.is_set():
                return False
            try:
                container.reload()
            except docker.errors.NotFound:
                return False
            return (container.attrs.get("State") or {}).get("Status") in _RUNNING
        finally:
            with self._lock:
                self._stream = self._client = None
            client.close()

    def _open(self, api: Any, container_id: str) -> CancellableStream:
        """The engine's log stream of the container, as (stream id, payload) frames."""
        params: dict[str, Any] = {"stdout": 1, "stderr": 1, "follow": 1, "timestamps": 1}
        if self._since is not None:
            params["since"] = f"{self._since:.9f}"
        url = f"{api.base_url}/v{api.api_version}/containers/{container_id}/logs"
        # No read timeout: a quiet container sends nothing for as long as it likes.
        response = api.get(url, params=params, stream=True, timeout=None)
        if response.status_code >= 400:
            why = response.text.strip()
            response.close()
            raise LaunchError(f"reading the logs of {self._instance_id}: {why}")
        return CancellableStream(_frames(response.raw), response)

    def _take(self, stream_id: int, payload: bytes) -> list[LogLine]:
        """The lines of one frame: ``<RFC 3339 time> <text>``, the text a whole line or,
        past 16 KiB, a part of one (no newline at its end: the next frame continues it)."""
        stream = _FRAME_STREAMS.get(stream_id)
        if stream is None:
            return []
        stamp, _, text = payload.partition(b" ")
        when = _timestamp(stamp.decode("ascii", errors="replace")) or time.time()
        # Not compared with the previous line: the engine gives every line of one read from
        # the app the same time.
        if self._since is not None and when <= self._since:
            return []  # before the given since, or delivered before a reconnect
        self._last = when
        splitter = self._splitters.setdefault(stream, LineSplitter())
        return [LogLine(stream, line, when) for line in splitter.feed(text)]


def _frames(raw: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """A multiplexed stream's frames as (stream id, payload): what the SDK's
    ``_multiplexed_response_stream_helper`` reads, with the stream id kept."""
    while True:
        header = raw.read(_FRAME_HEADER.size)
        if len(header) < _FRAME_HEADER.size:
            return
        stream_id, length = _FRAME_HEADER.unpack(header)
        if not length:
            continue
        payload = raw.read(length)
        if not payload:
            return
        yield stream_id, payload


class _EventStream(_Follower):
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
        super().__init__(client_factory, "tidegate-docker-events")
        self._filters = {"label": label_filter, "type": "container", "event": ["die", "destroy"]}
        self._since = f"{since:.9f}"
        self._deliver = deliver
        self._last_nano = 0
        self._seen_at_last: set[tuple[str, str]] = set()

    def _describe(self) -> str:
        return "the Docker event stream"

    def _finish(self) -> None:
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


class _BuildOutput:
    """What a build's stream of JSON records said: the image's id, or the error and the last
    lines of output before it (the failing step and what its command printed)."""

    def __init__(self) -> None:
        self.image_id: str | None = None  # from the "aux" record, as "sha256:..."
        self.built: str | None = None  # the short id of "Successfully built ..."
        self.error: str | None = None
        self._tail: deque[str] = deque(maxlen=_BUILD_TAIL)
        self._partial = ""  # output text after the last newline

    def read(self, stream: Iterable[dict[str, Any]]) -> None:
        for record in stream:
            text = record.get("stream")
            if isinstance(text, str):
                self._add(text)
            aux = record.get("aux")
            if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
                self.image_id = aux["ID"]
            if record.get("error") or record.get("errorDetail"):
                detail = record.get("errorDetail") or {}
                message = detail.get("message") or record.get("error") or "the build failed"
                self.error = " ".join(str(message).split())
        self._add("\n")

    def failure(self, what: str, why: str) -> str:
        """The LaunchError message: what failed, why, and the output that led there."""
        if not self._tail:
            return f"{what}: {why}"
        return f"{what}: {why} (build output ended: {' | '.join(self._tail)})"

    def _add(self, text: str) -> None:
        lines = (self._partial + _ANSI.sub("", text).replace("\r", "\n")).split("\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.strip()
            if not line:
                continue
            log.debug("build: %s", line)
            if line.startswith("Successfully built "):
                self.built = line.rpartition(" ")[2]
            # the builder's own bookkeeping says nothing about what went wrong
            if line.startswith(("--->", "Removing intermediate container", "Successfully ")):
                continue
            if len(line) > _BUILD_LINE_MAX:
                line = line[: _BUILD_LINE_MAX - 3] + "..."
            self._tail.append(line)


def _read_text(path: str) -> str:
    with open(path, "rb") as file:
        return file.read().decode("utf-8", errors="replace")


_ESCAPE_DIRECTIVE = re.compile(r"#\s*escape\s*=\s*(\S)\s*", re.IGNORECASE)
_DIRECTIVE = re.compile(r"#\s*[A-Za-z]+\s*=")
_ARG_REF = re.compile(
    r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::([-+])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def _external_images(dockerfile: str) -> builtins.list[tuple[int, str]]:
    """The images a Dockerfile builds on that are not its own stages, as (line, reference):
    every FROM and ``COPY --from``. References are expanded with the global ARGs' defaults
    (tidegate passes no build args, so those are the values the engine uses); one that still
    holds a variable is left to the engine."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    seen_from = False
    found: builtins.list[tuple[int, str]] = []
    for number, keyword, rest in _instructions(dockerfile):
        words = rest.split()
        if keyword == "ARG" and not seen_from:
            for word in words:
                name, eq, default = word.partition("=")
                args[name] = default.strip("\"'") if eq else ""
        elif keyword == "FROM":
            seen_from = True
            names = [word for word in words if not word.startswith("--")]  # --platform=...
            if names:
                ref = _expand(names[0], args)
                if ref is not None and ref.lower() != "scratch" and ref.lower() not in stages:
                    found.append((number, ref))
            if len(names) >= 3 and names[1].lower() == "as":
                stages.add(names[2].lower())
        elif keyword == "COPY":
            for word in words:
                if not word.startswith("--"):
                    break
                flag, _, source = word.partition("=")
                if flag.lower() != "--from" or not source or "$" in source:
                    continue
                if not source.isdigit() and source.lower() not in stages:
                    found.append((number, source))
    return list(dict.fromkeys(found))


def _instructions(dockerfile: str) -> Iterator[tuple[int, str, str]]:
    """A Dockerfile's instructions as (first line, keyword in upper case, the rest), with
    continuation lines joined and comments and parser directives skipped, as the engine reads
    them (the ``escape`` directive included)."""
    escape = "\\"
    lines = dockerfile.splitlines()
    directives = True  # parser directives may only come first
    i = 0
    while i < len(lines):
        number, line = i + 1, lines[i].strip()
        i += 1
        if directives:
            match = _ESCAPE_DIRECTIVE.fullmatch(line)
            if match:
                escape = match.group(1)
                continue
            if _DIRECTIVE.match(line):
                continue
            directives = False
        if not line or line.startswith("#"):
            continue
        while line.endswith(escape):
            line = line[:-1]
            while i < len(lines) and (not lines[i].strip() or lines[i].lstrip().startswith("#")):
                i += 1  # comments and empty lines inside a continued instruction
            if i == len(lines):
                break
            line += lines[i].rstrip()
            i += 1
        keyword, _, rest = line.partition(" ")
        if "\t" in keyword:
            keyword, _, more = keyword.partition("\t")
            rest = f"{more} {rest}"
        yield number, keyword.upper(), rest.strip()


def _expand(word: str, args: Mapping[str, str]) -> str | None:
    """`word` with $NAME, ${NAME}, ${NAME:-word} and ${NAME:+word} replaced from `args`
    (unset is empty, as in the engine); None when that leaves a variable or nothing."""

    def value(match: re.Match[str]) -> str:
        current = args.get(match.group(1) or match.group(4), "")
        if match.group(2) == "-":
            return current or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if current else ""
        return current

    expanded = _ARG_REF.sub(value, word)
    return expanded if expanded and "$" not in expanded else None


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


def _join_all(streams: list[_EventStream | _LogFollower]) -> None:
    deadline = time.monotonic() + _CLOSE_JOIN
    for stream in streams:
        stream.join(max(0.0, deadline - time.monotonic()))
