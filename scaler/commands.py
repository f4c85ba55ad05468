"""`tidegate status`, `apply`, `pause`, `resume` and `delete`: clients of the scaler's API.

Each talks to a running scaler (`tidegate scaler` or `tidegate up`) over its control socket
(``--socket``, default as the scaler's), prints what happened and exits 0, or 1 with the
reason on stderr (the scaler unreachable, an unknown service, a rejected file), or 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec

from ingress.control import ControlError
from scaler.api import ScalerClient, default_scaler_socket
from scaler.messages import ApplyFile, ServiceStatus, StatusReport

__all__ = ["add_parsers", "format_status"]

_T = TypeVar("_T")


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="services, their instances and load",
        description="Show each service: state, instances ready/starting/desired, requests "
        "in flight and queued, requests/s and p99 over the last 10 s. With SERVICE, also "
        "its instances, the last scaling reason, errors and back-off.",
    )
    status.add_argument("service", nargs="?", metavar="SERVICE")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(func=_status)
    apply = subparsers.add_parser(
        "apply",
        help="validate and apply service files to a running scaler",
        description="Check the files (each on its own and together with the running "
        "services) and apply them: new services start, changed ones are updated in place "
        "or, when what an instance is made of changed, replaced instance by instance "
        "without dropping a request. A bad file changes nothing.",
    )
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(func=_apply)
    for name, help_text, func in (
        ("pause", "stop every instance now; the next request cold-starts one", _pause),
        ("resume", "back to min_size after a pause", _resume),
        ("delete", "drain and stop a service's instances and remove its route", _delete),
    ):
        sub = subparsers.add_parser(name, help=help_text, description=help_text + ".")
        sub.add_argument("service", metavar="SERVICE")
        sub.set_defaults(func=func)
    for sub in (status, apply, *[subparsers.choices[n] for n in ("pause", "resume", "delete")]):
        sub.add_argument(
            "--socket",
            default=None,
            metavar="PATH",
            help="the scaler's control socket (default: the one `tidegate scaler` uses)",
        )


def _call(args: argparse.Namespace, command: Callable[[ScalerClient], Awaitable[_T]]) -> _T:
    path = args.socket or default_scaler_socket()

    async def main() -> _T:
        client = ScalerClient(path)
        try:
            return await command(client)
        finally:
            await client.close()

    try:
        return asyncio.run(main())
    except ControlError as exc:
        if exc.status == 0:
            raise _Failure(
                f"cannot reach the scaler on {path} (is `tidegate scaler` or `tidegate up` "
                f"running? --socket names another): {exc}"
            ) from None
        raise _Failure(exc.message) from None


class _Failure(Exception):
    pass


def _fail(prog: str, exc: Exception) -> int:
    print(f"tidegate {prog}: {exc}", file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    try:
        report = _call(args, lambda c: c.status(args.service))
    except _Failure as exc:
        return _fail("status", exc)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report).decode()) + "\n")
    else:
        sys.stdout.write(format_status(report, detail=args.service is not None))
    return 0


def _apply(args: argparse.Namespace) -> int:
    files = []
    for name in args.files:
        path = os.path.abspath(name)
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except OSError as exc:
            return _fail("apply", Exception(f"{name}: cannot read: {exc.strerror}"))
        except UnicodeDecodeError as exc:
            return _fail("apply", Exception(f"{name}: not UTF-8 text (byte {exc.start})"))
        files.append(ApplyFile(path=path, text=text))
    try:
        response = _call(args, lambda c: c.apply(files))
    except _Failure as exc:
        return _fail("apply", exc)
    for result in response.results:
        print(f"{result.service}: {result.action} (revision {result.revision})")
    return 0


def _pause(args: argparse.Namespace) -> int:
    try:
        status = _call(args, lambda c: c.pause(args.service))
    except _Failure as exc:
        return _fail("pause", exc)
    print(f"{status.name}: paused; the next request starts an instance again")
    return 0


def _resume(args: argparse.Namespace) -> int:
    try:
        status = _call(args, lambda c: c.resume(args.service))
    except _Failure as exc:
        return _fail("resume", exc)
    print(f"{status.name}: resumed (min_size {status.min_size})")
    return 0


def _delete(args: argparse.Namespace) -> int:
    try:
        _call(args, lambda c: c.delete(args.service))
    except _Failure as exc:
        return _fail("delete", exc)
    print(f"{args.service}: deleted")
    return 0


# -- the table ------------------------------------------------------------------------------

_COLUMNS = (
    "SERVICE",
    "STATE",
    "READY",
    "STARTING",
    "DESIRED",
    "INFLIGHT",
    "QUEUED",
    "REQ/S",
    "P99",
)


def format_status(report: StatusReport, *, detail: bool = False) -> str:
    """The status table (and with ``detail`` each service's instances and history)."""
    rows = [list(_COLUMNS)]
    for s in report.services:
        rows.append(
            [
                s.name,
                s.state,
                str(s.ready),
                str(s.starting),
                str(s.desired),
                str(s.inflight),
                str(s.queued),
                f"{s.requests_per_second:.1f}",
                _duration(s.p99_seconds),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    if not report.services:
        lines = ["no services"]
    for s in report.services:
        if detail:
            lines.extend(_detail(s))
        elif s.last_error and s.state == "failing":
            lines.append(f"{s.name}: {s.last_error} (next start in {s.retry_in:.0f}s)")
    for error in report.errors:
        lines.append(f"not loaded: {error.error}")
    return "\n".join(lines) + "\n"


def _detail(s: ServiceStatus) -> list[str]:
    lines = [
        "",
        f"service {s.name} ({s.runtime}, revision {s.revision})",
        f"  routes: {', '.join(s.domains) if s.domains else 'the default route'}",
        f"  size: min {s.min_size}, max {s.max_size}, {s.max_concurrency} requests per instance",
        f"  desired {s.desired}: {s.reason}",
        f"  scale events: {s.scale_events.get('up', 0)} up, {s.scale_events.get('down', 0)} down",
        f"  last cold start: {_duration(s.last_cold_start_seconds)}",
        f"  instance-seconds: {s.active_instance_seconds:.0f} active, "
        f"{s.idle_instance_seconds:.0f} idle",
    ]
    if s.last_error:
        lines.append(f"  last error: {s.last_error}")
    if s.start_failures:
        lines.append(
            f"  {s.start_failures} failed start(s) in a row; next start in {s.retry_in:.1f}s"
        )
    for inst in s.instances:
        old = "" if inst.current else "  (previous revision)"
        lines.append(
            f"  instance {inst.id}  {inst.state}  {inst.address or '-'}  "
            f"{inst.inflight} in flight  up {inst.age_seconds:.0f}s{old}"
        )
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1.0:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.2f}s"
