"""`tidegate cost SERVICE [--since 24h]`: what the service's instances would cost on App Runner.

It reads the service's usage records from its system log, ``<log dir>/<service>/system.log``
and the rotated ``system.log.1``, ``.2``, ... (oldest first), and prices them with
:mod:`scaler.cost`, next to the always-on alternative. A usage record is one JSON line::

    {"time": "2026-11-26T12:00:00.123Z", "event": "usage", "active_seconds": 1.5,
     "idle_seconds": 58.5, "cpu": 0.5, "memory_bytes": 1000000000, ...}

``active_seconds`` and ``idle_seconds`` are instance-seconds since the service's previous
usage record; ``cpu`` (vCPUs) and ``memory_bytes`` the size of its instances then. Other
events are ignored; lines that cannot be read as such a record are skipped and counted.

**The period** a selection of records covers runs from the previous record's time (where the
first selected record's increments began) to the last selected record's time; with no
earlier record in the files it starts at the first selected record. ``--since`` selects the
records at or after a time (``24h`` ago, ``7d`` ago, or an RFC 3339 time); default: all the
files hold.

Exit status: 0; 1 if the service has no logs or no usage records in the period; 2 on a
usage error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from scaler import cost, logs
from scaler.cost import Cost
from scaler.logcmd import default_log_dir

__all__ = [
    "ReadResult",
    "Summary",
    "UsageRecord",
    "add_parser",
    "log_files",
    "read_usage",
    "summarize",
]

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")  # a service name (DNS label)


# -- reading --------------------------------------------------------------------------------
# Files, times and --since come from scaler.logs; the reading stays here rather than going
# through logs.read_records, which skips lines it cannot decode, because the report counts
# them (ReadResult.malformed).


@dataclass(frozen=True, slots=True)
class UsageRecord:
    time: float  # Unix seconds
    active_seconds: float  # instance-seconds with a request in flight since the last record
    idle_seconds: float  # instance-seconds without one
    cpu: float  # vCPUs per instance
    memory_bytes: float  # memory per instance


@dataclass
class ReadResult:
    records: list[UsageRecord] = field(default_factory=list)  # in file order, oldest first
    malformed: int = 0  # lines skipped: not JSON, or a usage record missing a field
    files: list[Path] = field(default_factory=list)  # the files read, oldest first


def log_files(log_dir: Path, service: str) -> list[Path]:
    """The service's system log files, oldest first (:func:`scaler.logs.log_files`)."""
    return logs.log_files(log_dir / service, logs.SYSTEM_LOG)


def read_usage(files: Iterable[Path]) -> ReadResult:
    """The usage records in ``files`` (read in the order given)."""
    result = ReadResult()
    for path in files:
        try:
            with path.open("rb") as lines:
                result.files.append(path)
                for line in lines:
                    if not line.strip():
                        continue
                    try:
                        record = _parse_line(line)
                    except ValueError:
                        result.malformed += 1
                        continue
                    if record is not None:
                        result.records.append(record)
        except FileNotFoundError:
            continue  # rotated away between listing and opening
    return result


def _parse_line(line: bytes) -> UsageRecord | None:
    """The record, or None for another event; ValueError if the line is malformed."""
    data = json.loads(line)  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("event") != "usage":
        return None
    try:
        moment = data["time"]
        if not isinstance(moment, str):
            raise TypeError(f"not a time: {moment!r}")
        when = logs.parse_time(moment)
        numbers = [
            _number(data[key]) for key in ("active_seconds", "idle_seconds", "cpu", "memory_bytes")
        ]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a usage record: {exc}") from None
    if any(n < 0 for n in numbers):
        raise ValueError("a negative quantity")
    return UsageRecord(when, *numbers)


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"not a number: {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"not finite: {value!r}")
    return number


# -- summing --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    start: float  # Unix seconds: where the period's first increment began
    end: float  # the last record's time
    records: int
    active_seconds: float  # instance-seconds
    idle_seconds: float
    cost: Cost  # each record priced at its own size
    cpu: float  # the latest record's size: the always-on alternative's
    memory_bytes: float
    sizes: int  # distinct (cpu, memory) sizes in the period

    @property
    def period_seconds(self) -> float:
        return self.end - self.start

    def always_on(self, instances: int = 1) -> Cost:
        return cost.always_on(self.period_seconds, self.cpu, self.memory_bytes, instances)


def summarize(records: Iterable[UsageRecord], since: float | None = None) -> Summary | None:
    """The records at or after ``since`` (all if None), summed and priced; None if none."""
    ordered = sorted(records, key=lambda r: r.time)  # stable: file order among equal times
    before = [r for r in ordered if since is not None and r.time < since]
    chosen = ordered[len(before) :]
    if not chosen:
        return None
    total = cost.ZERO
    active = idle = 0.0
    for r in chosen:
        active += r.active_seconds
        idle += r.idle_seconds
        total += cost.price(
            r.active_seconds, r.active_seconds + r.idle_seconds, r.cpu, r.memory_bytes
        )
    last = chosen[-1]
    return Summary(
        start=before[-1].time if before else chosen[0].time,
        end=last.time,
        records=len(chosen),
        active_seconds=active,
        idle_seconds=idle,
        cost=total,
        cpu=last.cpu,
        memory_bytes=last.memory_bytes,
        sizes=len({(r.cpu, r.memory_bytes) for r in chosen}),
    )


# -- the command ----------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "cost",
        help="what a service's instances would cost on App Runner",
        description="Price a service's instance-seconds with AWS App Runner's public model "
        f"({cost.VCPU_HOUR_USD} USD per vCPU-hour while active, i.e. a request in flight; "
        f"{cost.GB_HOUR_USD} USD per GB-hour of memory while provisioned, active included; "
        "1 GB = 10^9 bytes), next to the always-on alternative: instances billed as active "
        "for the whole period. Reads the usage records in the service's system log.",
    )
    parser.add_argument("service", type=_service_name, metavar="SERVICE")
    parser.add_argument(
        "--since",
        default=None,
        metavar="WHEN",
        help="only usage recorded since then: a duration ago (90m, 24h, 7d) or an RFC 3339 "
        "time (default: all the log files hold)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the services' logs are (default: logs under the state directory, "
        "/var/lib/tidegate/logs as root)",
    )
    parser.add_argument(
        "--always-on-instances",
        type=_positive_int,
        default=1,
        metavar="N",
        help="instances in the always-on alternative (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.set_defaults(func=run)


def _service_name(text: str) -> str:
    if not _NAME.match(text):
        raise argparse.ArgumentTypeError(f"not a service name (a DNS label): {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def run(args: argparse.Namespace) -> int:
    now = time.time()
    since: float | None = None
    if args.since is not None:
        try:
            since = logs.parse_since(args.since, now)
        except ValueError as exc:
            print(f"tidegate cost: --since: {exc}", file=sys.stderr)
            return 2
    log_dir: Path = args.log_dir if args.log_dir is not None else default_log_dir()
    files = log_files(log_dir, args.service)
    if not files:
        print(
            f"tidegate cost: no logs for service {args.service!r} in {log_dir} (is that its "
            "name? --log-dir names another directory)",
            file=sys.stderr,
        )
        return 1
    read = read_usage(files)
    summary = summarize(read.records, since)
    if summary is None:
        when = "" if since is None else f" since {_utc(since)}"
        skipped = f"; {read.malformed} malformed line(s) skipped" if read.malformed else ""
        print(
            f"tidegate cost: no usage records for {args.service!r}{when} in "
            f"{log_dir / args.service}{skipped}",
            file=sys.stderr,
        )
        return 1
    if args.json:
        sys.stdout.write(json.dumps(_as_json(args, since, read, summary), indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(_report(args.service, since, read, summary, args)) + "\n")
    return 0


def _report(
    service: str, since: float | None, read: ReadResult, s: Summary, args: argparse.Namespace
) -> list[str]:
    hours = s.period_seconds / cost.SECONDS_PER_HOUR
    active_h = s.active_seconds / cost.SECONDS_PER_HOUR
    idle_h = s.idle_seconds / cost.SECONDS_PER_HOUR
    c = s.cost
    n = args.always_on_instances
    alt = s.always_on(n)
    size = f"{s.cpu:g} vCPU, {_gb(s.memory_bytes)} GB memory per instance"
    if s.sizes > 1:
        size += f" (the latest of {s.sizes} sizes; each record is priced at its own)"
    selected = "all records" if since is None else f"records since {_utc(since)}"
    lines = [
        f"service {service}: {_utc(s.start)} to {_utc(s.end)} ({hours:.2f} h; "
        f"{s.records} usage record(s), {selected})",
        f"  instance-hours: {active_h:.4f} active, {idle_h:.4f} idle, "
        f"{active_h + idle_h:.4f} provisioned",
        f"  size: {size}",
        "",
        f"App Runner's model ({cost.VCPU_HOUR_USD} USD/vCPU-hour active, "
        f"{cost.GB_HOUR_USD} USD/GB-hour provisioned, 1 GB = 10^9 bytes):",
        f"  compute: {c.vcpu_hours:.4f} vCPU-h x {cost.VCPU_HOUR_USD} = {c.compute_usd:.4f} USD",
        f"  memory:  {c.gb_hours:.4f} GB-h x {cost.GB_HOUR_USD} = {c.memory_usd:.4f} USD",
        f"  total:   {c.total_usd:.4f} USD",
        "",
        f"always on ({n} instance(s) of the latest size, billed as active for the whole "
        f"{hours:.2f} h):",
        f"  {alt.vcpu_hours:.4f} vCPU-h x {cost.VCPU_HOUR_USD} + {alt.gb_hours:.4f} GB-h x "
        f"{cost.GB_HOUR_USD} = {alt.total_usd:.4f} USD",
    ]
    if alt.total_usd > 0:
        saving = alt.total_usd - c.total_usd
        lines.append(
            f"saving: {saving:.4f} USD ({saving / alt.total_usd:.1%} of always on)"
            if saving >= 0
            else f"saving: none; {-saving:.4f} USD more than always on"
        )
    else:
        lines.append("saving: - (the period is too short to compare)")
    if read.malformed:
        lines.append(f"note: {read.malformed} malformed line(s) skipped")
    return lines


def _as_json(
    args: argparse.Namespace, since: float | None, read: ReadResult, s: Summary
) -> dict[str, object]:
    alt = s.always_on(args.always_on_instances)

    def priced(c: Cost) -> dict[str, float]:
        return {
            "vcpu_hours": c.vcpu_hours,
            "gb_hours": c.gb_hours,
            "compute_usd": c.compute_usd,
            "memory_usd": c.memory_usd,
            "total_usd": c.total_usd,
        }

    return {
        "service": args.service,
        "since": None if since is None else _rfc3339(since),
        "start": _rfc3339(s.start),
        "end": _rfc3339(s.end),
        "period_seconds": s.period_seconds,
        "records": s.records,
        "malformed_lines": read.malformed,
        "files": [str(f) for f in read.files],
        "active_instance_seconds": s.active_seconds,
        "idle_instance_seconds": s.idle_seconds,
        "cpu": s.cpu,
        "memory_bytes": s.memory_bytes,
        "prices": {
            "vcpu_hour_usd": cost.VCPU_HOUR_USD,
            "gb_hour_usd": cost.GB_HOUR_USD,
            "bytes_per_gb": cost.BYTES_PER_GB,
        },
        "cost": priced(s.cost),
        "always_on": {"instances": args.always_on_instances, **priced(alt)},
        "saving_usd": alt.total_usd - s.cost.total_usd,
    }


def _gb(memory_bytes: float) -> str:
    return f"{memory_bytes / cost.BYTES_PER_GB:g}"


def _utc(unix: float) -> str:
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rfc3339(unix: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
