"""Running wrk and reading its report.

`parse_wrk_output` is a pure function from wrk's text report (as printed with `--latency`) to a
`WrkResult`; `run_wrk` is the thin shell that builds the command, runs it with a hard time
limit and hands stdout to the parser. Keeping the parser free of processes lets the unit tests
feed it reports captured from real runs.

wrk prints durations through its `format_time_us` helper, whose units are us, ms, s, m and h
(wrk `src/units.c`); all latencies here are converted to milliseconds.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "WrkError",
    "WrkResult",
    "parse_wrk_output",
    "run_wrk",
    "wrk_command",
]

# Milliseconds per unit of wrk's `format_time_us` (wrk `src/units.c`).
_TIME_UNITS_MS: dict[str, float] = {
    "us": 1e-3,
    "ms": 1.0,
    "s": 1e3,
    "m": 60e3,
    "h": 3600e3,
}

_NUM = r"([0-9]+(?:\.[0-9]+)?)"
_RE_RPS = re.compile(r"^Requests/sec:\s+" + _NUM + r"\s*$", re.MULTILINE)
_RE_PERCENTILE = re.compile(r"^\s*(50|75|90|99)%\s+" + _NUM + r"(us|ms|s|m|h)\s*$", re.MULTILINE)
_RE_TOTAL = re.compile(r"^\s*([0-9]+) requests in " + _NUM + r"(us|ms|s|m|h),", re.MULTILINE)
_RE_SOCKET = re.compile(
    r"^\s*Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)\s*$",
    re.MULTILINE,
)
# wrk counts a response as an error when its status is > 399 (wrk `src/wrk.c`,
# `response_complete`), although the line says "Non-2xx or 3xx".
_RE_NON_2XX = re.compile(r"^\s*Non-2xx or 3xx responses: ([0-9]+)\s*$", re.MULTILINE)

# Slack on top of the test duration before a wrk run is declared hung: wrk needs a moment to
# connect and to print, and a connection stuck past its own --timeout must not stall the matrix.
_RUN_SLACK_S = 15.0


class WrkError(RuntimeError):
    """wrk failed to run, overran its time limit, or printed a report we cannot read."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run's figures; latencies in milliseconds, counts in requests."""

    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    duration_s: float
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeout_errors: int = 0
    non_2xx: int = 0

    @property
    def socket_errors(self) -> int:
        """Sum of wrk's four socket-error counters."""
        return self.connect_errors + self.read_errors + self.write_errors + self.timeout_errors

    @property
    def flagged(self) -> bool:
        """True when the run cannot be trusted: errors, or no request completed at all."""
        return self.socket_errors > 0 or self.non_2xx > 0 or self.requests == 0


def _to_ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS_MS[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Read a wrk `--latency` report; raise WrkError if a required line is missing."""
    rps = _RE_RPS.search(text)
    total = _RE_TOTAL.search(text)
    percentiles = {
        m.group(1): _to_ms(m.group(2), m.group(3)) for m in _RE_PERCENTILE.finditer(text)
    }
    missing = [
        name
        for name, found in (
            ("Requests/sec", rps),
            ("N requests in T", total),
            ("50% latency", "50" in percentiles),
            ("99% latency", "99" in percentiles),
        )
        if not found
    ]
    if missing or rps is None or total is None:
        raise WrkError(f"wrk report lacks {', '.join(missing)} (was --latency passed?)")
    # The socket-error and non-2xx lines are printed only when their counts are non-zero.
    socket = _RE_SOCKET.search(text)
    connect, read, write, timeout = (int(g) for g in socket.groups()) if socket else (0, 0, 0, 0)
    non_2xx = _RE_NON_2XX.search(text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(total.group(1)),
        duration_s=_to_ms(total.group(2), total.group(3)) / 1e3,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeout_errors=timeout,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
    )


def wrk_command(
    url: str,
    *,
    connections: int,
    duration_s: int,
    threads: int = 1,
    timeout_s: int = 5,
    wrk: str = "wrk",
    cpu_prefix: Sequence[str] = (),
) -> list[str]:
    """The argv of one wrk run; `cpu_prefix` is e.g. ["taskset", "-c", "0"] or empty."""
    return [
        *cpu_prefix,
        wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration_s}s",
        "--timeout",
        f"{timeout_s}s",
        "--latency",
        url,
    ]


def run_wrk(argv: Sequence[str], duration_s: int) -> WrkResult:
    """Run a wrk command built by `wrk_command` and parse its report, bounded in time."""
    try:
        # subprocess.run kills wrk itself on timeout and on any exception (Ctrl-C included).
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=duration_s + _RUN_SLACK_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {duration_s + _RUN_SLACK_S:.0f} s") from exc
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise WrkError(f"wrk exited {done.returncode}: {said}")
    return parse_wrk_output(done.stdout)
