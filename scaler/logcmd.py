"""`tidegate logs SERVICE [--system] [--follow] [--since 10m] [--json]`: a service's logs.

It reads the files the scaler writes (:mod:`scaler.logs`), not the scaler, so it works with
the scaler stopped, and on the logs of a service since deleted. Without ``--system``: the
instances' output, ``TIME  INSTANCE  STREAM  line``; with it: the scaler's events for the
service, ``TIME  EVENT  message`` (each scale decision's message holds the numbers behind
it; ``--json`` shows them as fields too). ``--json`` prints the records as they are stored,
one JSON object per line. ``--since`` takes a duration back from now (``90s``, ``10m``,
``2h``, ``7d``) or an RFC 3339 time. ``--follow`` keeps printing new records, across
rotations, until Ctrl-C or SIGTERM, and exits 0.

Exit status: 0; 1 when the service has no logs in the log directory; 2 on a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from ingress.paths import state_root
from scaler.logs import (
    LogsNotFound,
    encode_record,
    follow_records,
    format_record,
    parse_since,
    read_records,
)

__all__ = ["add_parser", "default_log_dir", "run"]


def default_log_dir() -> Path:
    """``logs`` in tidegate's state directory: where the daemons log unless told otherwise."""
    return state_root() / "logs"


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "logs",
        help="a service's instance output, or its scaler events (--system)",
        description="Print a service's logs: its instances' stdout and stderr (default), or "
        "the scaler's events for it (--system): starts, health, draining, stops, exit codes, "
        "back-off and every scale decision with the numbers behind it.",
    )
    parser.add_argument("service", metavar="SERVICE")
    parser.add_argument(
        "--system", action="store_true", help="the scaler's events, not the instances' output"
    )
    parser.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new records until Ctrl-C"
    )
    parser.add_argument(
        "--since",
        metavar="WHEN",
        help="only records from then on: a duration back from now (10m, 2h, 7d) or an "
        "RFC 3339 time (2026-11-26T12:00:00Z)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the daemons' log directory (default: logs in the state directory, "
        "$XDG_STATE_HOME/tidegate/logs, or /var/lib/tidegate/logs as root; a daemon run with "
        "--state-dir X logs to X/logs)",
    )
    parser.add_argument(
        "--json", action="store_true", help="the records as stored, one JSON object per line"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    since: float | None = None
    if args.since is not None:
        try:
            since = parse_since(args.since, time.time())
        except ValueError as exc:
            print(f"tidegate logs: --since: {exc}", file=sys.stderr)
            return 2
    log_dir: Path = args.log_dir or default_log_dir()
    try:
        if args.follow:
            with _until_signalled():
                records = follow_records(log_dir, args.service, system=args.system, since=since)
                _print(records, json=args.json, out=sys.stdout, flush=True)
        else:
            records = read_records(log_dir, args.service, system=args.system, since=since)
            _print(records, json=args.json, out=sys.stdout, flush=False)
    except ValueError as exc:  # not a service name
        print(f"tidegate logs: {exc}", file=sys.stderr)
        return 2
    except LogsNotFound as exc:
        print(f"tidegate logs: {exc}", file=sys.stderr)
        return 1
    except _Stop:
        return 0
    except BrokenPipeError:  # `tidegate logs x | head`: the reader has what it wanted
        _silence_stdout()
        return 0
    return 0


def _print(records: Iterable[dict[str, Any]], *, json: bool, out: TextIO, flush: bool) -> None:
    for record in records:
        out.write(encode_record(record).decode() if json else format_record(record) + "\n")
        if flush:
            out.flush()


class _Stop(Exception):
    """Ctrl-C or SIGTERM while following."""


@contextlib.contextmanager
def _until_signalled() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`_Stop` (an exit 0, no traceback) while inside."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
