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
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import msgspec

from ingress.cli import add_common_flags, run_loop, settings_from_args
from ingress.control import ControlClient, ControlError
from ingress.paths import state_root
from ingress.server import Ingress, IngressSettings, print_addresses, start_activated
from ingress.systemd import Notifier, Ticker, start_watchdog
from ingress.unixsock import ControlSocketError
from scaler import statuspage
from scaler.api import ScalerApiServer, default_scaler_socket
from scaler.daemon import Scaler, check_scope
from scaler.metrics import ScalerCollector
from scaler.serve import (
    add_log_dir_flag,
    add_scope_flag,
    add_state_dir_flag,
    log_dir_for,
    reload_service_files,
)
from scaler.spec import ServiceSpec, SpecError, load_service_files

__all__ = ["UP_SCOPE", "add_parser", "run"]

# `tidegate up`'s instances are its own: beside a `tidegate scaler` on the same host (scope
# "default"), neither adopts or removes the other's
UP_SCOPE = "up"

log = logging.getLogger("tidegate.up")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "up",
        help="run the ingress and the scaler in the foreground for these service files",
        description="Run the ingress and the scaler in one process for these service files: "
        "instances start when requests arrive and stop when they end. Ctrl-C or SIGTERM "
        "drains in-flight requests, stops the instances started here and exits 0. The "
        "metrics listener serves the scaler's metrics too.",
    )
    parser.add_argument("files", nargs="+", metavar="FILE", help="service files (YAML)")
    add_state_dir_flag(parser)
    add_log_dir_flag(parser)
    add_scope_flag(parser, UP_SCOPE)
    parser.add_argument(
        "--scaler-socket",
        default=None,
        metavar="PATH",
        help="the scaler's control socket, for `tidegate status`, `apply`, `pause` and "
        "`resume` (default as `tidegate scaler`'s; if another process holds the default "
        "one, up runs without it)",
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
        check_scope(args.scope)
    except ValueError as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 2
    try:
        specs = load_service_files(args.files)
    except SpecError as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 1
    state_dir = args.state_dir if args.state_dir is not None else state_root()
    try:
        return run_loop(
            up(
                settings,
                specs,
                [str(Path(f).resolve()) for f in args.files],
                state_dir=state_dir,
                scaler_socket=args.scaler_socket,
                log_dir=log_dir_for(args.log_dir, state_dir),
                scope=args.scope,
            )
        )
    except (OSError, ValueError, ControlSocketError, ControlError, SpecError) as exc:
        print(f"tidegate up: {exc}", file=sys.stderr)
        return 1


async def up(
    settings: IngressSettings,
    specs: list[ServiceSpec],
    files: list[str],
    *,
    state_dir: Path,
    scaler_socket: str | None = None,
    log_dir: Path | None = None,
    scope: str = UP_SCOPE,
) -> int:
    """Serve ``specs`` (read from ``files``) until SIGTERM/SIGINT; the process runtime keeps
    its records under ``state_dir``. ``scaler_socket`` None: the default path, skipped with
    a warning when another process holds it. ``log_dir``: the services' logs (None: none)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier.from_environ()  # first: no instance may inherit NOTIFY_SOCKET
    watchdog = start_watchdog(loop, notifier)
    ticker: Ticker | None = None
    reloads: set[asyncio.Task[None]] = set()
    with tempfile.TemporaryDirectory(prefix="tidegate-up-") as tmp:
        socket_path = os.path.join(tmp, "ingress.sock")
        settings = msgspec.structs.replace(settings, control_socket=socket_path)
        ingress = Ingress(settings)
        control = ControlClient(socket_path)
        scaler = Scaler(control, state_dir=state_dir, log_dir=log_dir, scope=scope)
        ingress.registry.register(ScalerCollector(scaler.controllers))
        api = ScalerApiServer(scaler, scaler_socket or default_scaler_socket())
        started = False
        try:
            # not ready (503 on /-/ready) until the services are put: before that, every
            # request would get a 404
            await start_activated(
                ingress, mark_ready=False, admin_routes=statuspage.routes(scaler.status)
            )
            api_path: str | None = api.path
            try:
                await api.start()
            except ControlSocketError as exc:
                if scaler_socket is not None:
                    raise
                log.warning("no scaler control socket (status, apply, pause): %s", exc)
                api_path = None
            started = True
            await scaler.start(list(zip(specs, files, strict=True)))
            if scaler.errors:
                raise SpecError(scaler.errors[0].file, "", scaler.errors[0].error)
            ingress.set_ready()
            _print_addresses(ingress, specs, api_path)
            log.info("ready (pid %d)", os.getpid())
            notifier.ready(f"serving {len(specs)} service(s) on {ingress.listening_text()}")
            ticker = Ticker(loop, 5.0, lambda: notifier.status(ingress.status_text()))

            def reload() -> None:
                task = loop.create_task(reload_service_files(scaler, files, notifier))
                reloads.add(task)  # held until done: the loop keeps only weak references
                task.add_done_callback(reloads.discard)

            loop.add_signal_handler(signal.SIGHUP, reload)
            await stop.wait()
            log.info("draining")
        finally:
            # Stop accepting and let in-flight requests finish, then stop the instances.
            loop.remove_signal_handler(signal.SIGHUP)
            for task in list(reloads):
                task.cancel()
            await asyncio.gather(*reloads, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
            await api.close()
            scaler.closing()
            await ingress.drain(
                on_draining=lambda n: notifier.stopping(f"draining {n} connection(s)")
            )
            if started:
                await scaler.close(stop_instances=True)
            else:
                await scaler.close_logs()
            await control.close()
            if watchdog is not None:
                watchdog.cancel()  # only now: stopping instances may outlast WatchdogSec
            notifier.close()
    return 0


def _print_addresses(ingress: Ingress, specs: list[ServiceSpec], scaler_socket: str | None) -> None:
    print_addresses(ingress, "tidegate up")
    if scaler_socket is not None:
        print(f"tidegate up: scaler control socket {scaler_socket}", flush=True)
    for spec in specs:
        where = ", ".join(spec.domains) if spec.domains else "the default route"
        print(f"tidegate up: service {spec.name} ({spec.runtime}) on {where}", flush=True)
