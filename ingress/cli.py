"""`tidegate ingress`: the ingress daemon alone, or a plain reverse proxy with --static-upstream."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from ingress.control import ControlSocketError
from ingress.messages import InstanceSpec, ServiceRouting, parse_address
from ingress.paths import runtime_root
from ingress.server import IngressSettings, serve, split_listen
from ingress.units import parse_duration, parse_size
from tidegate.config import ConfigError, add_config_flag, apply_config


def add_common_flags(parser: argparse.ArgumentParser) -> None:
    """Flags `tidegate up` shares with `tidegate ingress` (contract, section 2)."""
    parser.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="plain HTTP listener host:port, repeatable (default 127.0.0.1:8080); not used "
        "when systemd passes sockets (socket activation)",
    )
    parser.add_argument(
        "--tls-listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="HTTPS listener host:port, repeatable; under socket activation, the sockets "
        "named 'https' instead",
    )
    parser.add_argument(
        "--tls-cert",
        action="append",
        default=[],
        metavar="FILE",
        help="certificate (chain) file; pair each with --tls-key, repeatable (SNI picks)",
    )
    parser.add_argument(
        "--tls-key",
        action="append",
        default=[],
        metavar="FILE",
        help="private key file for the --tls-cert at the same position",
    )
    parser.add_argument(
        "--tls-self-signed",
        action="store_true",
        help="generate a local CA and certificate (kept on disk across restarts)",
    )
    parser.add_argument("--tls-state-dir", metavar="DIR", help="where --tls-self-signed keeps them")
    parser.add_argument(
        "--tls-hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="names for the self-signed certificate (default localhost)",
    )
    parser.add_argument(
        "--metrics-listen",
        default="127.0.0.1:9464",
        metavar="ADDR",
        help="metrics, /-/healthy and /-/ready (default 127.0.0.1:9464; 'off' to disable)",
    )
    parser.add_argument("--keepalive-timeout", default="60s", metavar="DURATION")
    parser.add_argument(
        "--head-timeout",
        default="30s",
        metavar="DURATION",
        help="time to receive a request head once it started (slowloris)",
    )
    parser.add_argument(
        "--drain-timeout",
        default="30s",
        metavar="DURATION",
        help="on SIGTERM, time for in-flight requests to finish",
    )
    parser.add_argument(
        "--max-head-size",
        default="64KiB",
        metavar="SIZE",
        help="request head limit, 431 past it (default 64KiB)",
    )
    parser.add_argument("--upstream-idle-timeout", default="4s", metavar="DURATION")
    parser.add_argument(
        "--access-log",
        default="-",
        metavar="PATH",
        help="one JSON line per request, to this file (default '-': standard output); "
        "reopened on SIGUSR1 for logrotate",
    )
    parser.add_argument("--no-access-log", action="store_true", help="do not write the access log")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "ingress",
        help="run the ingress daemon alone",
        description="Run the ingress: an HTTP/1.1 + TLS reverse proxy that routes by Host, "
        "balances to the least-loaded instance and holds requests while instances are busy. "
        "With --static-upstream it is a plain reverse proxy with no scaler.",
    )
    add_common_flags(parser)
    parser.add_argument(
        "--control-socket",
        metavar="PATH",
        help="unix socket of the control API for the scaler (default: none in static mode, "
        "else /run/tidegate/ingress.sock)",
    )
    parser.add_argument(
        "--routes-file",
        metavar="PATH",
        help="keep the routing table the scaler put in this file and load it at start, so a "
        "restarted ingress routes at once instead of answering 404 until the scaler puts it "
        "again (default: not kept)",
    )
    parser.add_argument(
        "--static-upstream",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="an instance to proxy to, repeatable: one instance each, no scaler",
    )
    parser.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="static mode: in-flight requests per upstream (default unlimited)",
    )
    parser.add_argument(
        "--queue-max",
        type=int,
        default=1000,
        metavar="N",
        help="static mode: held requests at most (default 1000)",
    )
    parser.add_argument(
        "--queue-timeout",
        default="30s",
        metavar="DURATION",
        help="static mode: held longer than this gets 503 (default 30s)",
    )
    parser.add_argument(
        "--request-timeout",
        default="120s",
        metavar="DURATION",
        help="static mode: whole request, then 504 (default 120s)",
    )
    parser.add_argument("--connect-timeout", default="5s", metavar="DURATION")
    parser.add_argument(
        "--max-body-size",
        metavar="SIZE",
        help="static mode: request body limit, 413 past it (default none)",
    )
    add_config_flag(parser, example="/etc/tidegate/ingress.yaml")  # after every other flag
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> IngressSettings:
    if len(args.tls_cert) != len(args.tls_key):
        raise ValueError("each --tls-cert needs a --tls-key (and the other way round)")
    if args.tls_self_signed and args.tls_cert:
        raise ValueError("--tls-self-signed and --tls-cert exclude each other")
    metrics = None if args.metrics_listen in ("off", "") else args.metrics_listen
    for flag, addresses in (
        ("--listen", args.listen or []),
        ("--tls-listen", args.tls_listen),
        ("--metrics-listen", [metrics] if metrics else []),
    ):
        for address in addresses:
            try:
                split_listen(address)
            except ValueError as exc:
                raise ValueError(f"{flag}: {exc}") from None
    control = getattr(args, "control_socket", None)
    routes_file = getattr(args, "routes_file", None)
    return IngressSettings(
        listen=args.listen or ["127.0.0.1:8080"],
        tls_listen=args.tls_listen,
        tls_certs=list(zip(args.tls_cert, args.tls_key, strict=True)),
        tls_self_signed=args.tls_self_signed,
        tls_state_dir=args.tls_state_dir,
        tls_hostnames=args.tls_hostname or ["localhost"],
        metrics_listen=metrics,
        control_socket=control,
        keepalive_timeout=parse_duration(args.keepalive_timeout),
        head_timeout=parse_duration(args.head_timeout),
        drain_timeout=parse_duration(args.drain_timeout),
        max_head_bytes=parse_size(args.max_head_size),
        upstream_idle_timeout=parse_duration(args.upstream_idle_timeout),
        access_log=None if args.no_access_log else args.access_log,
        routes_file=routes_file,
    )


def static_routing(args: argparse.Namespace) -> ServiceRouting:
    """Static mode: one default service with one instance per --static-upstream."""
    instances = []
    for i, address in enumerate(args.static_upstream):
        try:
            parse_address(address)
        except ValueError as exc:
            raise ValueError(f"--static-upstream: {exc}") from None
        instances.append(InstanceSpec(id=f"static-{i}", address=address))
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency: must be >= 1 (got {args.max_concurrency})")
    if args.queue_max < 0:
        raise ValueError(f"--queue-max: must be >= 0 (got {args.queue_max})")
    max_body = parse_size(args.max_body_size) if args.max_body_size else None
    return ServiceRouting(
        name="static",
        default=True,
        max_concurrency=args.max_concurrency,
        queue_max_length=args.queue_max,
        queue_timeout=parse_duration(args.queue_timeout),
        request_timeout=parse_duration(args.request_timeout),
        connect_timeout=parse_duration(args.connect_timeout),
        max_body_bytes=max_body,
        instances=instances,
    )


def default_control_socket() -> str:
    """``ingress.sock`` in tidegate's runtime directory (:func:`ingress.paths.runtime_root`)."""
    return str(runtime_root() / "ingress.sock")


def run(args: argparse.Namespace) -> int:
    try:
        args = apply_config(args)
    except ConfigError as exc:
        print(f"tidegate ingress: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        routings = [static_routing(args)] if args.static_upstream else []
        if not routings and not args.control_socket:
            args.control_socket = default_control_socket()
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"tidegate ingress: {exc}", file=sys.stderr)
        return 2
    try:
        return run_loop(serve(settings, routings))
    except (OSError, ValueError, ControlSocketError) as exc:
        # configuration and environment problems (a port in use, an unreadable certificate,
        # a socket path owned by a live process): one line, no traceback
        print(f"tidegate ingress: {exc}", file=sys.stderr)
        return 1


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run a coroutine on uvloop, the loop the ingress is built and measured for."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
