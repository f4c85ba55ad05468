"""`tidegate status`, `apply`, `pause`, `resume` and `delete`: clients of the scaler's API.

Each talks to a running scaler (`tidegate scaler` or `tidegate up`) over its control socket
(``--socket``, default as the scaler's), prints what happened and exits 0, or 1 with the
reason on stderr (the scaler unreachable, an unknown service, a rejected file), or 2 on a
usage error.

`tidegate status --watch` redraws the table every ``--interval`` until Ctrl-C (exit 0). On a
terminal it clears the screen first (ANSI codes); into a pipe or file it prints a separator
line (``--- <UTC time>``) before each table instead, so every frame stays readable. If the
scaler goes away meanwhile it says so on stderr and exits 1.

`tidegate cost` is registered here too but lives in :mod:`scaler.costcmd`: it reads the
services' logs, not the scaler.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO, TypeVar

import msgspec

from ingress.control import ControlError
from ingress.units import parse_duration
from scaler import costcmd
from scaler.api import ScalerClient, default_scaler_socket
from scaler.messages import ApplyFile, ServiceStatus, StatusReport

__all__ = ["add_parsers", "format_status"]

_T = TypeVar("_T")

DEFAULT_WATCH_INTERVAL = "1s"
MIN_WATCH_INTERVAL = 0.1  # seconds; the ingress's stats come every 100 ms, faster shows nothing
# Cursor home, then erase the whole screen (ECMA-48 CUP and ED): what `watch` and `top` send.
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


def add_parsers(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = subparsers.add_parser(
        "status",
        help="services, their instances and load",
        description="Show each service: state, instances ready/starting/desired, requests "
        "in flight and queued, requests/s and p99 over the last 10 s. With SERVICE, also "
        "its instances, the last scaling reason, errors and back-off.",
    )
    status.add_argument("service", nargs="?", metavar="SERVICE")
    status.add_argument(
        "--json",
        action="store_true",
        help="print the status as JSON (with --watch: one JSON document per line)",
    )
    status.add_argument(
        "-w",
        "--watch",
        action="store_true",
        help="redraw every --interval until Ctrl-C (a terminal is cleared each time; a pipe "
        "gets a '--- TIME' separator line before each table)",
    )
    status.add_argument(
        "--interval",
        type=_interval,
        default=parse_duration(DEFAULT_WATCH_INTERVAL),
        metavar="DURATION",
        help=f"how often --watch redraws, e.g. 500ms, 2s (default {DEFAULT_WATCH_INTERVAL})",
    )
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
    costcmd.add_parser(subparsers)  # reads the logs, not the scaler: no --socket


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


def _interval(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds < MIN_WATCH_INTERVAL:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_WATCH_INTERVAL * 1000:.0f}ms (got {text!r})"
        )
    return seconds


def _status(args: argparse.Namespace) -> int:
    if args.watch:
        return _watch(args)
    try:
        report = _call(args, lambda c: c.status(args.service))
    except _Failure as exc:
        return _fail("status", exc)
    if args.json:
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report).decode()) + "\n")
    else:
        sys.stdout.write(format_status(report, detail=args.service is not None))
    return 0


def _watch(args: argparse.Namespace) -> int:
    """`status --watch`: a frame every ``args.interval`` until Ctrl-C or the scaler goes."""
    path = args.socket or default_scaler_socket()
    out = sys.stdout
    tty = out.isatty()

    async def main() -> None:
        client = ScalerClient(path)
        loop = asyncio.get_running_loop()
        try:
            next_frame = loop.time()
            frames = 0
            while True:
                try:
                    report = await client.status(args.service)
                except ControlError as exc:
                    raise _Failure(_lost(path, exc, first=frames == 0)) from None
                _frame(out, report, args, tty=tty)
                frames += 1
                # a steady cadence: the next frame is due one interval after this one was,
                # not after this one was printed (skipping frames a slow call made late)
                next_frame += args.interval
                now = loop.time()
                if next_frame < now:
                    next_frame = now + args.interval
                await asyncio.sleep(next_frame - now)
        finally:
            await client.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        return 0  # Ctrl-C is how a watch ends
    except _Failure as exc:
        return _fail("status", exc)
    except BrokenPipeError:
        # the reader went away (`| head`): quietly, and without a second error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return 0  # pragma: no cover (the loop only ends by an exception)


def _lost(path: str, exc: ControlError, *, first: bool) -> str:
    if exc.status != 0:
        return exc.message  # e.g. the watched service was deleted
    if first:
        return (
            f"cannot reach the scaler on {path} (is `tidegate scaler` or `tidegate up` "
            f"running? --socket names another): {exc}"
        )
    return f"lost the scaler on {path}: {exc}"


def _frame(out: TextIO, report: StatusReport, args: argparse.Namespace, *, tty: bool) -> None:
    """One redraw: the table (or a JSON line) with what marks a new frame."""
    if args.json:
        out.write(msgspec.json.encode(report).decode() + "\n")
    else:
        stamp = datetime.datetime.fromtimestamp(time.time(), datetime.UTC)
        stamp_text = stamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        table = format_status(report, detail=args.service is not None)
        if tty:
            every = f"every {args.interval:g}s"
            out.write(f"{_CLEAR_SCREEN}tidegate status, {every}, {stamp_text} (Ctrl-C ends)\n\n")
        else:
            out.write(f"--- {stamp_text}\n")
        out.write(table)
    out.flush()


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
    for event in s.recent_scale_events[:5]:
        lines.append(
            f"  {event.ago_seconds:.0f}s ago: scaled {event.direction} "
            f"{event.from_desired} -> {event.to_desired}: {event.reason}"
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
