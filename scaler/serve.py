"""`tidegate scaler`: the scaler daemon alone, driving an ingress over its control socket.

It loads the service files and directories given, waits for the ingress (so the two can be
started in any order, as systemd may), adopts the instances an earlier scaler left, and
serves its own control API (`tidegate status`, `apply`, `pause`, `resume`, `delete`) and its
metrics. SIGTERM or SIGINT leave the instances serving: the next scaler adopts them, and no
request fails across a restart. `tidegate up` runs the same :class:`~scaler.daemon.Scaler`
next to an ingress in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from prometheus_client import CollectorRegistry

from ingress.admin import AdminServer
from ingress.cli import default_control_socket, run_loop
from ingress.control import ControlClient, ControlError
from ingress.paths import state_root
from ingress.server import split_listen
from ingress.systemd import Notifier, Ticker, start_watchdog
from ingress.unixsock import ControlSocketError
from scaler import statuspage
from scaler.api import ScalerApiServer, default_scaler_socket
from scaler.daemon import DEFAULT_SCOPE, Scaler, check_scope, load_paths
from scaler.metrics import ScalerCollector
from scaler.spec import MAX_SIZE_LIMIT
from tidegate.config import ConfigError, add_config_flag, apply_config

__all__ = [
    "add_log_dir_flag",
    "add_parser",
    "add_scope_flag",
    "add_state_dir_flag",
    "log_dir_for",
    "reload_service_files",
    "run",
]

log = logging.getLogger("tidegate.scaler")

DEFAULT_METRICS_LISTEN = "127.0.0.1:9465"
_INGRESS_RETRY = 1.0  # seconds between attempts to reach the ingress at start


def add_state_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the process runtime keeps its instance records, so a restart adopts "
        "them (default $STATE_DIRECTORY, else /var/lib/tidegate as root, else "
        "$XDG_STATE_HOME/tidegate or ~/.local/state/tidegate)",
    )


def add_scope_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--scope",
        default=default,
        metavar="NAME",
        help="the instances this scaler owns: it adopts, and removes as orphans, only those "
        "of its scope (a tidegate.scope label on containers, a directory for processes), so "
        "two scalers on one host leave each other's alone (default %(default)s)",
    )


def add_log_dir_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where each service's system and app logs go, <DIR>/<service>/system.log and "
        "app.log (default: logs in the state directory, so --state-dir X logs to X/logs)",
    )


def log_dir_for(log_dir: Path | None, state_dir: Path) -> Path:
    """``--log-dir``, else ``logs`` in the state directory (``tidegate logs``' default when
    ``--state-dir`` is not given either: :func:`ingress.paths.state_root`)."""
    return log_dir if log_dir is not None else state_dir / "logs"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "scaler",
        help="the scaler daemon alone",
        description="Run the scaler daemon: start and stop the services' instances as the "
        "ingress's load asks, over the ingress's control socket. Bad files are reported in "
        "`tidegate status` and the log; the other services run. On SIGTERM the instances "
        "keep serving, for the next scaler to adopt.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        metavar="PATH",
        help="service files, or directories of them (*.yaml, *.yml); none: start empty "
        "and take services from `tidegate apply`",
    )
    parser.add_argument(
        "--ingress-socket",
        default=None,
        metavar="PATH",
        help="the ingress's control socket (default: the one `tidegate ingress` uses)",
    )
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help="the scaler's own control socket (default $RUNTIME_DIRECTORY/scaler.sock, else "
        "/run/tidegate/scaler.sock as root, else $XDG_RUNTIME_DIR/tidegate/scaler.sock)",
    )
    parser.add_argument(
        "--metrics-listen",
        default=DEFAULT_METRICS_LISTEN,
        metavar="ADDR",
        help="host:port for /metrics, /-/healthy and /-/ready (default %(default)s; "
        "empty to turn off)",
    )
    parser.add_argument(
        "--max-size-limit",
        type=int,
        default=MAX_SIZE_LIMIT,
        metavar="N",
        help="the highest autoscaling.max_size a service file may ask for (default %(default)s)",
    )
    add_state_dir_flag(parser)
    add_log_dir_flag(parser)
    add_scope_flag(parser, DEFAULT_SCOPE)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    add_config_flag(parser, example="/etc/tidegate/scaler.yaml")  # after every other flag
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        args = apply_config(args)
    except ConfigError as exc:
        print(f"tidegate scaler: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.max_size_limit < 1:
        print("tidegate scaler: --max-size-limit must be >= 1", file=sys.stderr)
        return 2
    try:
        check_scope(args.scope)
    except ValueError as exc:
        print(f"tidegate scaler: --scope: {exc}", file=sys.stderr)
        return 2
    metrics: tuple[str, int] | None = None
    if args.metrics_listen:
        try:
            metrics = split_listen(args.metrics_listen)
        except ValueError as exc:
            print(f"tidegate scaler: --metrics-listen: {exc}", file=sys.stderr)
            return 2
    state_dir = args.state_dir or state_root()
    try:
        return run_loop(
            serve(
                args.paths,
                ingress_socket=args.ingress_socket or default_control_socket(),
                socket_path=args.socket or default_scaler_socket(),
                metrics=metrics,
                state_dir=state_dir,
                max_size_limit=args.max_size_limit,
                log_dir=log_dir_for(args.log_dir, state_dir),
                scope=args.scope,
            )
        )
    except (OSError, ControlSocketError) as exc:
        print(f"tidegate scaler: {exc}", file=sys.stderr)
        return 1


async def serve(
    paths: list[str],
    *,
    ingress_socket: str,
    socket_path: str,
    metrics: tuple[str, int] | None,
    state_dir: Path,
    max_size_limit: int,
    log_dir: Path | None = None,
    scope: str = DEFAULT_SCOPE,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    notifier = Notifier.from_environ()  # first: no instance may inherit NOTIFY_SOCKET
    watchdog = start_watchdog(loop, notifier)
    control = ControlClient(ingress_socket)
    scaler = Scaler(
        control,
        state_dir=state_dir,
        max_size_limit=max_size_limit,
        log_dir=log_dir,
        scope=scope,
    )
    ready = False
    registry = CollectorRegistry()
    registry.register(ScalerCollector(scaler.controllers))
    admin = None
    if metrics is not None:
        admin = AdminServer(
            *metrics,
            ready=lambda: ready,
            registry=registry,
            routes=statuspage.routes(scaler.status),
        )
    api = ScalerApiServer(scaler, socket_path)
    started = False
    try:
        if admin is not None:
            await admin.start()
        await api.start()
        loaded, errors = load_paths(paths, max_size_limit=max_size_limit)
        notifier.status(f"waiting for the ingress on {ingress_socket}")
        if not await _wait_for_ingress(control, ingress_socket, stop):
            return 0
        await scaler.start(loaded, errors)
        started = True
        ready = True
        notifier.ready(_status_line(scaler))
        status_ticker = Ticker(loop, _STATUS_EVERY, lambda: notifier.status(_status_line(scaler)))

        reloads: set[asyncio.Task[None]] = set()

        def reload() -> None:
            task = loop.create_task(
                reload_service_files(scaler, paths, notifier, max_size_limit=max_size_limit)
            )
            reloads.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload)
        log.info(
            "ready: %d service(s), control socket %s%s (pid %d)",
            len(scaler.controllers),
            socket_path,
            f", metrics on {metrics[0]}:{admin.port}" if admin is not None and metrics else "",
            os.getpid(),
        )
        await stop.wait()
        log.info("stopping; the instances keep serving for the next scaler to adopt")
        notifier.stopping("stopping; the instances keep serving")
        loop.remove_signal_handler(signal.SIGHUP)
        status_ticker.cancel()
        for task in list(reloads):
            task.cancel()
        await asyncio.gather(*reloads, return_exceptions=True)
    finally:
        await api.close()
        if started:
            await scaler.close(stop_instances=False)
        else:
            await scaler.close_logs()
        await control.close()
        if admin is not None:
            await admin.close()
        if watchdog is not None:
            watchdog.cancel()  # only now: stopping may take longer than WatchdogSec
        notifier.close()
    return 0


_STATUS_EVERY = 5.0  # seconds between STATUS= lines for `systemctl status`


def _status_line(scaler: Scaler) -> str:
    services = scaler.status().services
    ready = sum(s.ready for s in services)
    line = f"{len(services)} service(s), {ready} instance(s) ready"
    if scaler.errors:
        line += f"; {len(scaler.errors)} file(s) not loaded: {scaler.errors[0].error}"
    return line


async def reload_service_files(
    scaler: Scaler, paths: list[str], notifier: Notifier, *, max_size_limit: int = MAX_SIZE_LIMIT
) -> None:
    """SIGHUP, for `tidegate scaler` and `tidegate up`: read the service files again and
    apply what changed; a bad file is reported and its service keeps running as it was."""
    notifier.send("RELOADING=1\nSTATUS=reloading the service files")
    log.info("reloading the service files")
    loaded, errors = load_paths(paths, max_size_limit=max_size_limit)
    try:
        results = await scaler.reload(loaded, errors)
    except Exception:
        log.exception("reload failed; the running configuration is kept")
    else:
        changed = [f"{r.service} {r.action}" for r in results if r.action != "unchanged"]
        log.info("reloaded: %s", ", ".join(changed) or "nothing changed")
    notifier.send("READY=1\nSTATUS=" + _status_line(scaler))


async def _wait_for_ingress(control: ControlClient, path: str, stop: asyncio.Event) -> bool:
    """Wait until the ingress answers on its control socket; False if stopped first."""
    told = False
    while not stop.is_set():
        try:
            await control.services()
            return True
        except ControlError as exc:
            if not told:
                log.warning("waiting for the ingress on %s: %s", path, exc)
                told = True
        try:
            async with asyncio.timeout(_INGRESS_RETRY):
                await stop.wait()
        except TimeoutError:
            pass
    return False
