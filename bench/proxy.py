"""`python -m bench proxy`: tidegate's ingress against nginx and HAProxy, side by side.

The machine this runs on is small and shared, so absolute figures mean little from one day to
the next; what is reported are ratios between targets measured in the same run. To keep drift
(another tenant waking up, thermal limits) from favouring one target, the targets take turns
within each cell of the matrix rather than each running its whole matrix in a block.

Matrix: body (small, 64k) x connections (50, 1) x target (direct, tidegate, tidegate+log,
nginx, haproxy), each run preceded by a warm-up that is thrown away, the whole repeated
`--rounds` times and summarized by the median of each figure. tidegate+log is the same
ingress with its access log written to a file, so the log's cost is read off one run: paired
round by round (`log_cost`), and as CPU per request, the processes' CPU time over the run
divided by its requests, which the machine's noise moves much less than requests/s.

The pure parts (`summarize`, `check_gates`) take measurements and return values, so the unit
tests exercise them with made-up figures; `main` is the shell that starts processes and wrk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import configs, procs, report
from bench.args import non_negative_int, positive_int
from bench.install import ensure_tools
from bench.wrk import WrkError, WrkResult, run_wrk, wrk_command

__all__ = [
    "CELLS",
    "GATE_CELL",
    "TARGETS",
    "Cell",
    "LogCost",
    "Measurement",
    "Row",
    "add_arguments",
    "check_gates",
    "log_cost",
    "main",
    "summarize",
]

# Canonical order: the order in which targets take turns within a cell, and of the table.
# tidegate+log: the same ingress with its access log on, to a file (metrics are on in both)
TARGETS = ("direct", "tidegate", "tidegate+log", "nginx", "haproxy")
_BODY_PATHS = {"small": configs.SMALL_PATH, "64k": configs.LARGE_PATH}
_CONNECTIONS = (50, 1)
_DEFAULT_DURATION_S = 10
_DEFAULT_WARMUP_S = 2
_DEFAULT_OUT = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True, slots=True, order=True)
class Cell:
    """One load setting: which body is fetched and over how many connections."""

    body: str
    connections: int

    def __str__(self) -> str:
        return f"{self.body}/{self.connections}"


CELLS = tuple(Cell(body, conns) for body in _BODY_PATHS for conns in _CONNECTIONS)
# The cell the SLO gates look at: small responses under concurrency, where per-request
# overhead in the proxy dominates.
GATE_CELL = Cell("small", 50)


@dataclass(frozen=True, slots=True)
class Measurement:
    """One measured (not warm-up) wrk run."""

    target: str
    cell: Cell
    round: int
    result: WrkResult
    command: tuple[str, ...]
    cpu_s: float | None = None  # CPU the target used during the run (None: not measured)

    @property
    def cpu_us_per_request(self) -> float | None:
        if self.cpu_s is None or not self.result.requests:
            return None
        return self.cpu_s / self.result.requests * 1e6


@dataclass(frozen=True, slots=True)
class Row:
    """The median figures of one target in one cell over all rounds, with its ratios.

    rps is requests per second, latencies are in milliseconds; a ratio is None when the
    target it compares with was not measured (or measured zero).
    """

    target: str
    body: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    rps_vs_direct: float | None
    rps_vs_nginx: float | None
    p99_vs_nginx: float | None
    rounds: int
    socket_errors: int
    non_2xx: int
    flagged: bool
    # CPU the target's processes used per request (µs, median): steadier than req/s on a
    # noisy machine, and it says what a change costs even where throughput hides it
    cpu_us: float | None = None


def _ratio(num: float, den: float | None) -> float | None:
    return None if not den else num / den


def summarize(measurements: Iterable[Measurement]) -> list[Row]:
    """Median per (target, cell) over rounds, then ratios to direct and to nginx in that cell."""
    grouped: dict[tuple[Cell, str], list[WrkResult]] = {}
    cpu: dict[tuple[Cell, str], list[float | None]] = {}
    for m in measurements:
        grouped.setdefault((m.cell, m.target), []).append(m.result)
        cpu.setdefault((m.cell, m.target), []).append(m.cpu_us_per_request)
    medians = {
        key: (
            statistics.median(r.requests_per_sec for r in results),
            statistics.median(r.p50_ms for r in results),
            statistics.median(r.p99_ms for r in results),
        )
        for key, results in grouped.items()
    }
    rows = []
    for cell in sorted({cell for cell, _ in grouped}, key=CELLS.index):
        direct = medians.get((cell, "direct"))
        nginx = medians.get((cell, "nginx"))
        for target in (t for t in TARGETS if (cell, t) in grouped):
            results = grouped[(cell, target)]
            rps, p50, p99 = medians[(cell, target)]
            rows.append(
                Row(
                    target=target,
                    body=cell.body,
                    connections=cell.connections,
                    rps=rps,
                    p50_ms=p50,
                    p99_ms=p99,
                    rps_vs_direct=_ratio(rps, direct[0] if direct else None),
                    rps_vs_nginx=_ratio(rps, nginx[0] if nginx else None),
                    p99_vs_nginx=_ratio(p99, nginx[2] if nginx else None),
                    rounds=len(results),
                    socket_errors=sum(r.socket_errors for r in results),
                    non_2xx=sum(r.non_2xx for r in results),
                    flagged=any(r.flagged for r in results),
                    cpu_us=_median_or_none(cpu[(cell, target)]),
                )
            )
    return rows


def _median_or_none(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known and len(known) == len(values) else None


@dataclass(frozen=True, slots=True)
class LogCost:
    """What the access log costs in one cell: tidegate+log against tidegate."""

    cell: Cell
    rps_change: float  # median over rounds of (with log / without) - 1, each round's pair
    cpu_us: float | None  # CPU per request without the log (median)
    cpu_us_log: float | None  # and with it
    rounds: int

    @property
    def cpu_change(self) -> float | None:
        if self.cpu_us is None or self.cpu_us_log is None or not self.cpu_us:
            return None
        return self.cpu_us_log / self.cpu_us - 1


def log_cost(measurements: Iterable[Measurement]) -> list[LogCost]:
    """The access log's cost per cell, from the rounds where both tidegates ran.

    Each round's pair ran back to back, so their ratio is less exposed to the machine's drift
    than the ratio of two medians taken over the whole run; the median of those per-round
    changes is what is reported, next to CPU per request, which noise moves much less.
    """
    by_key = {(m.cell, m.round, m.target): m for m in measurements}
    costs = []
    for cell in CELLS:
        pairs = [
            (by_key[(c, rnd, "tidegate")], m)
            for (c, rnd, target), m in by_key.items()
            if c == cell and target == "tidegate+log" and (c, rnd, "tidegate") in by_key
        ]
        pairs = [(a, b) for a, b in pairs if a.result.requests_per_sec > 0]
        if not pairs:
            continue
        costs.append(
            LogCost(
                cell=cell,
                rps_change=statistics.median(
                    b.result.requests_per_sec / a.result.requests_per_sec - 1 for a, b in pairs
                ),
                cpu_us=_median_or_none([a.cpu_us_per_request for a, _ in pairs]),
                cpu_us_log=_median_or_none([b.cpu_us_per_request for _, b in pairs]),
                rounds=len(pairs),
            )
        )
    return costs


def check_gates(
    rows: Sequence[Row], min_ratio_nginx: float | None, max_p99_ratio: float | None
) -> list[str]:
    """One message per missed SLO gate (empty when all pass or none is set).

    A gate that cannot be evaluated counts as missed: a release check must not pass because
    the figures it needs are absent or came from a run with errors.
    """
    if min_ratio_nginx is None and max_p99_ratio is None:
        return []
    by_target = {r.target: r for r in rows if Cell(r.body, r.connections) == GATE_CELL}
    tide, nginx = by_target.get("tidegate"), by_target.get("nginx")
    limits = (("--min-ratio-nginx", min_ratio_nginx), ("--max-p99-ratio", max_p99_ratio))
    gates = [(flag, limit) for flag, limit in limits if limit is not None]
    if tide is None or nginx is None:
        return [f"{flag} {limit:g}: needs targets tidegate and nginx" for flag, limit in gates]
    bad = [r.target for r in (tide, nginx) if r.flagged]
    if bad:
        return [
            f"{flag} {limit:g}: {' and '.join(bad)} {GATE_CELL} had errors" for flag, limit in gates
        ]
    missed = []
    if min_ratio_nginx is not None and (tide.rps_vs_nginx or 0.0) < min_ratio_nginx:
        missed.append(
            f"--min-ratio-nginx {min_ratio_nginx:g}: tidegate {GATE_CELL} made "
            f"{tide.rps_vs_nginx or 0.0:.2f}x nginx's req/s"
        )
    if max_p99_ratio is not None and (
        tide.p99_vs_nginx is None or tide.p99_vs_nginx > max_p99_ratio
    ):
        shown = "n/a" if tide.p99_vs_nginx is None else f"{tide.p99_vs_nginx:.2f}x"
        missed.append(
            f"--max-p99-ratio {max_p99_ratio:g}: tidegate {GATE_CELL} p99 was {shown} nginx's"
        )
    return missed


# --- the shell: processes and wrk ----------------------------------------------------------


def _start_targets(
    ws: procs.Workspace, tools: dict[str, str], plan: procs.CpuPlan, targets: Sequence[str]
) -> dict[str, procs.Endpoint]:
    """Start the backend and each selected proxy; "direct" is the backend itself."""
    backend = procs.start_backend(ws, tools["nginx"], plan.load_prefix())
    started = {"backend": backend}
    if "direct" in targets:
        started["direct"] = backend
    pin = plan.proxy_prefix()
    if "tidegate" in targets:
        started["tidegate"] = procs.start_tidegate(ws, backend.port, pin)
    if "tidegate+log" in targets:
        started["tidegate+log"] = procs.start_tidegate(
            ws,
            backend.port,
            pin,
            name="tidegate-log",
            access_log=str(ws.path("access.log")),
        )
    if "nginx" in targets:
        started["nginx"] = procs.start_nginx_proxy(ws, tools["nginx"], backend.port, pin)
    if "haproxy" in targets:
        started["haproxy"] = procs.start_haproxy(ws, tools["haproxy"], backend.port, pin)
    return started


def _run_one(
    target: str,
    endpoint: procs.Endpoint,
    backend: procs.Endpoint,
    cell: Cell,
    wrk: str,
    plan: procs.CpuPlan,
    duration_s: int,
    warmup_s: int,
) -> tuple[WrkResult, list[str], float]:
    """Warm up, then measure one target in one cell; returns the figures, the wrk argv and
    the CPU seconds the target used meanwhile."""
    # A dead server would show up as a wall of wrk connect errors; say who died instead.
    for proc in (backend.proc, endpoint.proc):
        if proc.exited():
            raise procs.StartError(f"{proc.name} died during the run:\n{proc.log_tail()}")
    url = endpoint.base_url + _BODY_PATHS[cell.body]

    def argv(seconds: int) -> list[str]:
        return wrk_command(
            url,
            connections=cell.connections,
            duration_s=seconds,
            wrk=wrk,
            cpu_prefix=plan.load_prefix(),
        )

    try:
        if warmup_s > 0:
            run_wrk(argv(warmup_s), warmup_s)
        command = argv(duration_s)
        before = procs.cpu_seconds(endpoint.proc.popen.pid)
        result = run_wrk(command, duration_s)
        return result, command, procs.cpu_seconds(endpoint.proc.popen.pid) - before
    except WrkError as exc:
        raise WrkError(f"{target} {cell}: {exc}") from exc


def _measure(
    started: dict[str, procs.Endpoint],
    targets: Sequence[str],
    wrk: str,
    plan: procs.CpuPlan,
    duration_s: int,
    warmup_s: int,
    rounds: int,
) -> list[Measurement]:
    """The matrix: rounds, then cells, then targets taking turns within the cell."""
    measurements = []
    total = rounds * len(CELLS) * len(targets)
    for rnd in range(1, rounds + 1):
        for cell in CELLS:
            for target in targets:
                result, command, cpu_s = _run_one(
                    target,
                    started[target],
                    started["backend"],
                    cell,
                    wrk,
                    plan,
                    duration_s,
                    warmup_s,
                )
                measurements.append(Measurement(target, cell, rnd, result, tuple(command), cpu_s))
                flag = "  ERRORS" if result.flagged else ""
                print(
                    f"[{len(measurements)}/{total}] round {rnd} {cell} {target}: "
                    f"{result.requests_per_sec:,.0f} req/s, p99 {result.p99_ms:.3f} ms{flag}",
                    file=sys.stderr,
                    flush=True,
                )
    return measurements


def _parse_targets(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = sorted(set(names) - set(TARGETS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none)'}; choose from {','.join(TARGETS)}"
        )
    return tuple(t for t in TARGETS if t in names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `proxy` subcommand's flags."""
    parser.add_argument(
        "--duration",
        type=positive_int,
        default=_DEFAULT_DURATION_S,
        metavar="S",
        help=f"seconds measured per target and cell (default {_DEFAULT_DURATION_S})",
    )
    parser.add_argument(
        "--warmup",
        type=non_negative_int,
        default=_DEFAULT_WARMUP_S,
        metavar="S",
        help=f"seconds of discarded load before each measurement (default {_DEFAULT_WARMUP_S})",
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        metavar="N",
        help="repeat the whole matrix N times and report medians (default 1)",
    )
    parser.add_argument(
        "--targets",
        type=_parse_targets,
        default=TARGETS,
        metavar="LIST",
        help=f"comma-separated subset of {','.join(TARGETS)} (default all)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=_DEFAULT_OUT,
        metavar="DIR",
        help="where the JSON and Markdown results go (default bench/results)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin proxies and load to separate CPUs (to see what pinning costs)",
    )
    parser.add_argument(
        "--min-ratio-nginx",
        type=float,
        default=None,
        metavar="R",
        help=f"fail unless tidegate {GATE_CELL} req/s is at least R x nginx's",
    )
    parser.add_argument(
        "--max-p99-ratio",
        type=float,
        default=None,
        metavar="R",
        help=f"fail unless tidegate {GATE_CELL} p99 is at most R x nginx's",
    )


def main(args: argparse.Namespace) -> int:
    """Run the matrix, print and save the results; 1 if an SLO gate was missed, else 0."""
    tools = ensure_tools()
    plan = procs.plan_cpus(os.sched_getaffinity(0), pin=not args.no_pin)
    targets: tuple[str, ...] = args.targets
    started_at = datetime.now(UTC)
    print(f"bench proxy: {plan.describe()}", file=sys.stderr, flush=True)
    with procs.Workspace() as ws:
        started = _start_targets(ws, tools, plan, targets)
        measurements = _measure(
            started, targets, tools["wrk"], plan, args.duration, args.warmup, args.rounds
        )
    rows = summarize(measurements)
    missed = check_gates(rows, args.min_ratio_nginx, args.max_p99_ratio)
    result = report.ProxyReport(
        started_at=started_at,
        machine=report.machine_info(tools),
        settings={
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "rounds": args.rounds,
            "targets": list(targets),
            "cells": [str(c) for c in CELLS],
            "cpu_pinning": plan.describe(),
            "wrk_threads": 1,
        },
        commands={name: ep.command for name, ep in started.items() if name != "direct"},
        configs={name: ep.config for name, ep in started.items() if ep.config and name != "direct"},
        wrk_commands=[list(m.command) for m in measurements if m.round == 1],
        rows=rows,
        runs=measurements,
        gates={"min_ratio_nginx": args.min_ratio_nginx, "max_p99_ratio": args.max_p99_ratio},
        missed=missed,
        log_costs=log_cost(measurements),
    )
    print(report.format_table(rows, plan.describe()))
    if result.log_costs:
        print("\n" + "\n".join(report.log_cost_lines(result.log_costs)))
    json_path, md_path = report.write(result, args.out)
    print(f"\nwrote {json_path}\n      {md_path}")
    for message in missed:
        print(f"SLO gate missed: {message}", file=sys.stderr)
    return 1 if missed else 0
