"""The scaler: one :class:`~scaler.controller.ServiceController` per service, and their feeds.

Both `tidegate scaler` and `tidegate up` run a :class:`Scaler`; it owns what the controllers
share (the runtimes, the health checker, the ingress's control client) and the two feeds:
the ingress's events (stats, cold starts, drained instances) and each runtime's exits. It is
also the target of the scaler's own control API (:mod:`scaler.api`).

Rules:

- **A bad file changes nothing.** :meth:`Scaler.apply` checks every file given, and the set
  against the services already running (names, domains, the default route), and builds the
  images it needs, before touching anything; any error rejects the whole apply. At start, a
  bad file is reported (:attr:`Scaler.errors`, `tidegate status`, the log) and the other
  services run.
- **Orphans only when sure.** Instances (and ingress routes) of services with no file are
  removed at start, but not while some file failed to load: that file may be the service's
  own, broken by an edit, and removing its running instances would turn a typo into an outage.
- **Leaving is not stopping.** :meth:`Scaler.close` stops the instances only when asked
  (`tidegate up` does). The standalone daemon leaves them serving, so a restarted scaler
  adopts them and no request fails across the restart.
- Apply, pause, resume and delete run one at a time (one lock): each sees the last one's end.
- **Logs** (with ``log_dir``; :mod:`scaler.logs`): each service's system log gets what its
  controller does, an ``applied`` record for each file loaded or applied (and ``deleted``),
  and every ``usage_interval`` (60 s) a ``usage`` record: the instance-seconds, active and
  idle, since its previous one (:class:`~scaler.usage.Usage` counts them cumulatively; the
  marks of what was already recorded are kept here), with the instance size, for `tidegate
  cost`. A usage record is also written when a service is added (zeros: where its accounting
  starts), before its instance size changes, when it is deleted and when the scaler stops,
  so every instance-second is in exactly one record at the size it ran at.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ingress.control import ControlClient, ControlError
from scaler.controller import (
    ServiceController,
    audit_runtime,
    dispatch_control_events,
    dispatch_runtime_events,
    remove_orphans,
)
from scaler.health import HealthChecker
from scaler.logs import ServiceLogs
from scaler.messages import (
    ApplyAction,
    ApplyFile,
    ApplyResponse,
    ApplyResult,
    FileError,
    ServiceStatus,
    StatusReport,
)
from scaler.runtime import LaunchError, Runtime
from scaler.spec import (
    MAX_SIZE_LIMIT,
    ServiceSpec,
    SpecError,
    check_together,
    load_service_file,
    parse_service_text,
)

__all__ = [
    "DEFAULT_SCOPE",
    "LABEL_SCOPE",
    "Loaded",
    "Scaler",
    "check_scope",
    "load_paths",
    "make_runtime",
]

_log = logging.getLogger("tidegate.scaler")

Loaded = tuple[ServiceSpec, str]  # a service and the file it came from
_SERVICE_SUFFIXES = (".yaml", ".yml")
USAGE_INTERVAL = 60.0  # seconds between usage records in each service's system log


def load_paths(
    paths: Iterable[str | os.PathLike[str]], *, max_size_limit: int = MAX_SIZE_LIMIT
) -> tuple[list[Loaded], list[FileError]]:
    """The services in these files and directories (``*.yaml`` and ``*.yml`` directly inside,
    in name order), and an error for each file that cannot be used. A file that clashes with
    an earlier one (same name, a domain taken, a second default route) is an error too."""
    files: list[str] = []
    errors: list[FileError] = []
    for path in paths:
        path = os.path.abspath(path)  # `apply` names files absolutely: errors must match
        if os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as exc:
                errors.append(FileError(path, f"cannot list: {exc.strerror}"))
                continue
            files.extend(os.path.join(path, n) for n in names if n.endswith(_SERVICE_SUFFIXES))
        else:
            files.append(path)
    loaded: list[Loaded] = []
    for file in files:
        try:
            spec = load_service_file(file, max_size_limit=max_size_limit)
            check_together([*loaded, (spec, file)])
        except SpecError as exc:
            errors.append(FileError(file, str(exc)))
            continue
        loaded.append((spec, file))
    return loaded, errors


LABEL_SCOPE = "tidegate.scope"  # which scaler's a container is
DEFAULT_SCOPE = "default"
_SCOPE_NAME = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_scope(scope: str) -> str:
    """A scope name is a DNS label (it becomes a label value and a directory name)."""
    if not _SCOPE_NAME.fullmatch(scope):
        raise ValueError(f"scope must be a DNS label [a-z0-9-], 1 to 63 characters (got {scope!r})")
    return scope


def make_runtime(kind: str, state_dir: Path, scope: str = DEFAULT_SCOPE) -> Runtime:
    """The runtime for ``kind`` in ``scope``: a scaler sees, adopts and removes as orphans
    only its own scope's instances, so two scalers on one host (a `tidegate up` beside the
    daemon) never take each other's. The process runtime keeps its records under
    ``state_dir/process/<scope>``; Docker containers carry the ``tidegate.scope`` label."""
    if kind == "process":
        from scaler.runtimes.process import ProcessRuntime

        return ProcessRuntime(state_dir / "process" / scope)
    from scaler.runtimes.docker import DockerRuntime  # imported only when a service needs it

    return DockerRuntime(scope_labels={LABEL_SCOPE: scope})


class Scaler:
    """Runs the services' controllers against one ingress (``control``); with ``log_dir``
    each service's system and app logs are written there."""

    def __init__(
        self,
        control: ControlClient,
        *,
        state_dir: Path,
        max_size_limit: int = MAX_SIZE_LIMIT,
        runtime_factory: Callable[[str, Path], Runtime] | None = None,
        scope: str = DEFAULT_SCOPE,
        environ: Mapping[str, str] = os.environ,
        log: logging.Logger = _log,
        log_dir: Path | None = None,
        usage_interval: float = USAGE_INTERVAL,
    ) -> None:
        self.controllers: dict[str, ServiceController] = {}
        self.errors: list[FileError] = []  # files that could not be loaded at start
        self._control = control
        self._state_dir = state_dir
        self._max_size_limit = max_size_limit
        self.scope = check_scope(scope)
        self._runtime_factory = runtime_factory or functools.partial(make_runtime, scope=scope)
        self._environ = environ
        self._log = log
        self._health = HealthChecker()
        self._runtimes: dict[str, Runtime] = {}
        self._sources: dict[str, str] = {}  # service -> the file it came from
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = asyncio.Event()
        self._lock = asyncio.Lock()
        self._from_paths: set[str] = set()  # services loaded from the scaler's own paths
        self.events = None if log_dir is None else ServiceLogs(log_dir)
        self._usage_interval = usage_interval
        # service -> (active, idle) instance-seconds already in its usage records
        self._usage_marks: dict[str, tuple[float, float]] = {}

    async def start(self, loaded: list[Loaded], errors: Iterable[FileError] = ()) -> None:
        """Start the given services (adopting their running instances); report ``errors``."""
        self.errors = list(errors)
        for error in self.errors:
            self._log.error("not loaded: %s", error.error)
        built: list[Loaded] = []
        for spec, source in loaded:
            try:
                built.append((await self._resolve_image(spec, source), source))
            except SpecError as exc:
                self._log.error("not loaded: %s", exc)
                self.errors.append(FileError(source, str(exc)))
        loop = asyncio.get_running_loop()
        self._tasks.append(
            loop.create_task(
                dispatch_control_events(self._control, self.controllers, closing=self._closing),
                name="ingress events",
            )
        )
        if self.events is not None:
            self._tasks.append(loop.create_task(self._usage_loop(), name="usage records"))
        kinds = {spec.runtime for spec, _ in built} | {"process"}
        for kind in sorted(kinds):
            self._runtime(kind)
        await self._remove_orphans({spec.name for spec, _ in built})
        for spec, source in built:
            await self._add(spec, source, "loaded")
        self._from_paths = {spec.name for spec, _ in loaded}

    def status(self, service: str | None = None) -> StatusReport:
        """Every service's status, or one's (KeyError if unknown), and the files not loaded."""
        if service is not None:
            return StatusReport(services=[self.controllers[service].status()], errors=self.errors)
        return StatusReport(
            services=[self.controllers[name].status() for name in sorted(self.controllers)],
            errors=self.errors,
        )

    async def apply(self, files: list[ApplyFile]) -> ApplyResponse:
        """Create, update or replace the services in ``files``; SpecError changes nothing."""
        async with self._lock:
            parsed: list[Loaded] = []
            for file in files:
                spec = parse_service_text(file.text, file.path, max_size_limit=self._max_size_limit)
                parsed.append((spec, file.path))
            given = {spec.name for spec, _ in parsed}
            running = [
                (c.spec, self._sources.get(name, f"service {name}"))
                for name, c in self.controllers.items()
                if name not in given
            ]
            check_together([*running, *parsed])
            built = [(await self._resolve_image(s, src), src) for s, src in parsed]
            results = []
            for spec, source in built:
                action = await self._apply_one(spec, source, record_unchanged=True)
                self.errors = [e for e in self.errors if e.file != source]
                results.append(ApplyResult(spec.name, action, spec.spec_hash()))
            return ApplyResponse(results=results)

    def pause(self, service: str) -> ServiceStatus:
        controller = self.controllers[service]
        controller.pause()  # it logs and records it
        return controller.status()

    def resume(self, service: str) -> ServiceStatus:
        controller = self.controllers[service]
        controller.resume()
        return controller.status()

    async def reload(self, loaded: list[Loaded], errors: Iterable[FileError]) -> list[ApplyResult]:
        """Make the services of the scaler's paths what the files now say (SIGHUP).

        Good files are applied like `tidegate apply` (a changed service rolls out without
        dropping a request); a bad one is reported and its service, if running, keeps its
        running configuration. Services whose file is gone are deleted, but only those that
        came from the paths (not from `tidegate apply` of another file), and not while some
        file fails to load: the broken file may be the service's own."""
        async with self._lock:
            self.errors = list(errors)
            results: list[ApplyResult] = []
            for spec, source in loaded:
                try:
                    spec = await self._resolve_image(spec, source)
                    others = [
                        (c.spec, self._sources.get(n, f"service {n}"))
                        for n, c in self.controllers.items()
                        if n != spec.name
                    ]
                    check_together([*others, (spec, source)])
                except SpecError as exc:
                    self.errors.append(FileError(source, str(exc)))
                    continue
                action = await self._apply_one(spec, source, record_unchanged=False)
                results.append(ApplyResult(spec.name, action, spec.spec_hash()))
            for error in self.errors:
                self._log.error("reload: not loaded: %s", error.error)
            names = {spec.name for spec, _ in loaded}
            if self.errors:
                self._from_paths |= names
            else:
                for gone in sorted(self._from_paths - names):
                    if gone in self.controllers:
                        await self._delete(gone)
                self._from_paths = names
            return results

    async def delete(self, service: str) -> None:
        """Drain and stop the service's instances, then remove its route at the ingress."""
        async with self._lock:
            await self._delete(service)

    async def _apply_one(
        self, spec: ServiceSpec, source: str, *, record_unchanged: bool
    ) -> ApplyAction:
        """Create the service, or update its controller (the lock is held). An explicit
        apply records even an unchanged file; a reload, which reads every file, does not."""
        controller = self.controllers.get(spec.name)
        if controller is None:
            await self._add(spec, source, "created")
            return "created"
        if spec.instance != controller.spec.instance:
            self._record_usage(spec.name)  # what ran so far, at the old size
        action = await controller.update(spec)
        self._sources[spec.name] = source
        if record_unchanged or action != "unchanged":
            self._record_applied(spec, source, action)
        return action

    async def _delete(self, service: str) -> None:
        """delete() with the lock held."""
        controller = self.controllers[service]
        self._log.info("%s: deleting", service)
        await controller.stop(drain=True)
        self._record_usage(service)
        if self.events is not None:
            message = "deleted: its instances are stopped and its route removed"
            self.events.system(service, "applied", message, action="deleted")
        del self.controllers[service]
        self._usage_marks.pop(service, None)
        self._sources.pop(service, None)
        with contextlib.suppress(ControlError):
            await self._control.delete_service(service)

    def closing(self) -> None:
        """Say that the ingress is about to go: its ending the subscription is expected."""
        self._closing.set()

    async def close(self, *, stop_instances: bool) -> None:
        """Stop the feeds; with ``stop_instances`` also every instance (without draining:
        the caller has drained the ingress), else leave them for the next scaler to adopt."""
        self._closing.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        controllers = list(self.controllers.values())
        if stop_instances:
            await asyncio.gather(
                *(c.stop(drain=False) for c in controllers), return_exceptions=True
            )
        else:
            await asyncio.gather(*(c.detach() for c in controllers), return_exceptions=True)
        await self._health.close()
        for runtime in self._runtimes.values():
            with contextlib.suppress(Exception):
                await runtime.close()
        for name in list(self.controllers):
            self._record_usage(name)
        await self.close_logs()

    async def close_logs(self) -> None:
        """Write out and close the logs (close() does; for a scaler that never started)."""
        if self.events is not None:
            await asyncio.to_thread(self.events.close)

    # -- inside ----------------------------------------------------------------------------

    def _runtime(self, kind: str) -> Runtime:
        runtime = self._runtimes.get(kind)
        if runtime is None:
            runtime = self._runtimes[kind] = self._runtime_factory(kind, self._state_dir)
            loop = asyncio.get_running_loop()
            self._tasks.append(
                loop.create_task(
                    dispatch_runtime_events(runtime, self.controllers), name=f"{kind} events"
                )
            )
            self._tasks.append(
                loop.create_task(audit_runtime(runtime, self.controllers), name=f"{kind} audit")
            )
        return runtime

    async def _add(self, spec: ServiceSpec, source: str, action: str) -> None:
        controller = ServiceController(
            spec,
            self._runtime(spec.runtime),
            self._control,
            self._health,
            workdir=str(Path(source).resolve().parent),
            environ=self._environ,
            log=self._log,
            events=self.events,
        )
        self.controllers[spec.name] = controller
        self._sources[spec.name] = source
        self._record_applied(spec, source, action)
        self._usage_marks[spec.name] = (0.0, 0.0)
        self._record_usage(spec.name)  # zeros: where this run's accounting starts
        await controller.start()

    def _record_applied(self, spec: ServiceSpec, source: str, action: str) -> None:
        scaling = spec.autoscaling
        message = f"{action} from {source} (revision {spec.spec_hash()})"
        self._log.info("%s: %s", spec.name, message)
        if self.events is not None:
            self.events.system(
                spec.name,
                "applied",
                message,
                action=action,
                file=source,
                revision=spec.spec_hash(),
                min_size=scaling.min_size,
                max_size=scaling.max_size,
                max_concurrency=scaling.max_concurrency,
                scale_down_delay=scaling.scale_down_delay,
            )

    def _record_usage(self, service: str) -> None:
        """A usage record: the service's instance-seconds since its previous one."""
        controller = self.controllers.get(service)
        if self.events is None or controller is None:
            return
        usage = controller.usage
        active, idle = self._usage_marks.get(service, (0.0, 0.0))
        self._usage_marks[service] = (usage.active_seconds, usage.idle_seconds)
        active, idle = usage.active_seconds - active, usage.idle_seconds - idle
        size = controller.spec.instance
        message = (
            f"instance-seconds: {active:.1f} active, {idle:.1f} idle "
            f"({size.cpu:g} vCPU, {size.memory / 1e9:g} GB each)"
        )
        self._log.debug("%s: %s", service, message)
        self.events.system(
            service,
            "usage",
            message,
            active_seconds=active,
            idle_seconds=idle,
            cpu=size.cpu,
            memory_bytes=size.memory,
        )

    async def _usage_loop(self) -> None:
        while True:
            await asyncio.sleep(self._usage_interval)
            for name in list(self.controllers):
                self._record_usage(name)

    async def _resolve_image(self, spec: ServiceSpec, source: str) -> ServiceSpec:
        """The spec with its image built, if it has ``build``; SpecError if the build fails."""
        if spec.build is None:
            return spec
        from scaler.build import resolve_image
        from scaler.runtimes.docker import DockerRuntime

        runtime = self._runtime("docker")
        if not isinstance(runtime, DockerRuntime):
            raise SpecError(source, "build", "needs the docker runtime")
        self._log.info("%s: building %s", spec.name, spec.build.context)
        try:
            return await resolve_image(spec, runtime)
        except LaunchError as exc:
            raise SpecError(source, "build", str(exc)) from None

    async def _remove_orphans(self, known: set[str]) -> None:
        if self.errors:
            self._log.warning(
                "not removing instances of services without a file while %d file(s) failed to load",
                len(self.errors),
            )
            return
        for runtime in self._runtimes.values():
            await remove_orphans(runtime, known, self._log)
        try:
            routed = await self._control.services()
        except ControlError as exc:
            self._log.warning("listing the ingress's services failed: %s", exc)
            return
        for routing in routed:
            if routing.name not in known:
                self._log.info("removing the route of %s: it has no file any more", routing.name)
                with contextlib.suppress(ControlError):
                    await self._control.delete_service(routing.name)
