"""`tidegate up FILE...`: the ingress and the scaler in one foreground process.

The single-host, all-in-one mode (contract, section 2). The pieces are the same as when the
daemons run apart: the ingress serves its control API on a unix socket (in a private temporary
directory) and the scaler talks to it through :class:`~ingress.control.ControlClient`, so this
mode exercises exactly the API a separate scaler uses. Per service there is one
:class:`~scaler.controller.ServiceController`; one task feeds them the ingress's events and one
per runtime feeds them the runtime's.

Files are loaded and checked before anything starts: a bad file exits 1 with its one-line
message. Instances outlive a crashed `tidegate up`: the next run adopts the running ones of
each service (the process runtime keeps its records in ``--state-dir``) and removes those of
services whose file is no longer given. On SIGTERM or SIGINT the ingress stops accepting
and lets in-flight requests finish (``--drain-timeout``), then every instance started here
is stopped, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import msgspec

from ingress.cli import add_common_flags, run_loop, settings_from_args
from ingress.control import ControlClient, ControlError, ControlSocketError
from ingress.server import Ingress, IngressSettings, print_addresses
from scaler.controller import (
    ServiceController,
    dispatch_control_events,
    dispatch_runtime_events,
    remove_orphans,
)
from scaler.health import HealthChecker
from scaler.runtime import Runtime
from scaler.spec import ServiceSpec, SpecError, load_service_files

__all__ = ["add_parser", "run"]

log = logging.getLogger("tidegate.up")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the ingress and the scaler in the foreground for these service files",
        description="Run the ingress and the scaler in one process for these service files: "
        "instances start when requests arrive and stop when they end. Ctrl-C or SIGTERM "
        "drains in-flight requests, stops the instances started here and exits 0.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="service files (YAML)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the process runtime keeps its instance records, so a restart adopts "
        "them (default $STATE_DIRECTORY, else /var/lib/tidegate as root, else "
        "~/.local/state/tidegate)",
    )
    add_common_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 2
    try:
        specs = load_service_files(args.files)
        for spec, path in zip(specs, args.files, strict=True):
            if spec.runtime == "docker" and spec.image is None:
                raise SpecError(path, "build", "not supported by tidegate up yet: give image")
    except SpecError as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 1
    workdirs = [str(Path(path).resolve().parent) for path in args.files]
    state_dir = args.state_dir if args.state_dir is not None else default_state_dir()
    try:
        return run_loop(up(settings, specs, workdirs, state_dir=state_dir))
    except (OSError, ValueError, ControlSocketError, ControlError) as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 1


def default_state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$STATE_DIRECTORY (set by systemd's StateDirectory=; the first of several), else
    /var/lib/tidegate when run as root, else ~/.local/state/tidegate."""
    given = environ.get("STATE_DIRECTORY", "").split(":")[0]
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path("/var/lib/tidegate")
    return Path.home() / ".local" / "state" / "tidegate"


async def up(
    settings: IngressSettings,
    specs: list[ServiceSpec],
    workdirs: list[str],
    *,
    state_dir: Path,
) -> int:
    """Serve ``specs`` (``workdirs``: each service file's directory) until SIGTERM/SIGINT;
    the process runtime keeps its records under ``state_dir``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with tempfile.TemporaryDirectory(prefix="tidegate-up-") as tmp:
        socket_path = os.path.join(tmp, "ingress.sock")
        settings = msgspec.structs.replace(settings, control_socket=socket_path)
        ingress = Ingress(settings)
        try:
            # not ready (503 on /-/ready) until the services are put: before that, every
            # request would get a 404
            await ingress.start(mark_ready=False)
        except BaseException:
            await ingress.close()
            raise
        control = ControlClient(socket_path)
        health = HealthChecker()
        runtimes: dict[str, Runtime] = {}
        controllers: dict[str, ServiceController] = {}
        tasks: list[asyncio.Task[None]] = []
        try:
            for spec, workdir in zip(specs, workdirs, strict=True):
                runtime = runtimes.get(spec.runtime)
                if runtime is None:
                    runtime = runtimes[spec.runtime] = _make_runtime(spec.runtime, state_dir)
                controllers[spec.name] = ServiceController(
                    spec, runtime, control, health, workdir=workdir
                )
            known = {spec.name for spec in specs}
            for runtime in runtimes.values():
                await remove_orphans(runtime, known, log)
            tasks.append(
                loop.create_task(dispatch_control_events(control, controllers, closing=stop))
            )
            for runtime in runtimes.values():
                tasks.append(loop.create_task(dispatch_runtime_events(runtime, controllers)))
            for controller in controllers.values():
                await controller.start()
            ingress.set_ready()
            _print_addresses(ingress, specs)
            log.info("ready (pid %d)", os.getpid())
            await stop.wait()
            log.info("draining")
        finally:
            stop.set()  # also on the way out after a failure: the subscription may end quietly
            # Stop accepting and let in-flight requests finish, then stop the instances.
            await ingress.drain()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(
                *(c.stop(drain=False) for c in controllers.values()), return_exceptions=True
            )
            await health.close()
            await control.close()
            for runtime in runtimes.values():
                with contextlib.suppress(Exception):
                    await runtime.close()
    return 0


def _make_runtime(kind: str, state_root: Path) -> Runtime:
    if kind == "process":
        from scaler.runtimes.process import ProcessRuntime

        return ProcessRuntime(state_root / "process")
    from scaler.runtimes.docker import DockerRuntime  # imported only when a service needs it

    return DockerRuntime()


def _print_addresses(ingress: Ingress, specs: list[ServiceSpec]) -> None:
    print_addresses(ingress, "tidegate up")
    for spec in specs:
        where = ", ".join(spec.domains) if spec.domains else "the default route"
        print(f"tidegate up: service {spec.name} ({spec.runtime}) on {where}", flush=True)
