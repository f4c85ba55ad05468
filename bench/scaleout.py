"""`python -m bench scaleout`: a step and a ramp load against `tidegate up`, second by second.

One `tidegate up` (docker runtime, the Docker tests' busybox `httpd` image, `min_size: 0`)
gets, from idle, a **step** to 5 x `max_concurrency` concurrent clients, then a **cool-down**
(a few seconds idle, then `tidegate pause` and `resume`, until it is back at zero instances),
then a **ramp** from 0 to the same number of clients. The pause is there because after a
burst the scaler keeps its instances for 60 s (Knative's panic mode); `--no-pause` waits
that out instead.
Every request is `GET /cgi-bin/slow?ms=50`, which the instance holds for 50 ms, so one
instance carries `max_concurrency` of them and the load needs 5 instances: everything above
that waits in tidegate's queue while instances start, and none may fail.

Recorded every second: offered load (clients), throughput, p50/p99 of the responses that
completed in that second, errors by kind (`bench.loadgen`), and the scaler's view (instances
ready, starting, desired; requests queued and in flight), sampled from its control API every
`--sample-interval`. Summarized per phase: requests, failures, throughput, latency, the time
to the first ready instance and to the capacity the phase's load needs, and the latency once
that capacity was there ("steady").

The pure parts (`plan_phases`, `per_second`, `summarize`, `check_gates`, the formatting,
`service_file`) take values and return values, so the unit tests run them without Docker;
`main` is the shell that starts tidegate, the load and the sampler.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import coldstart, procs, report
from bench.args import non_negative_int, positive_int
from bench.coldstart import percentile
from bench.loadgen import IDLE, RAMP, STEP, LoadGenerator, Phase, RequestRecord, Span
from ingress.units import parse_duration

__all__ = [
    "SERVICE",
    "Gates",
    "PhaseSummary",
    "RunData",
    "Sample",
    "ScaleoutReport",
    "Second",
    "Summary",
    "add_arguments",
    "check_gates",
    "format_markdown",
    "format_summary",
    "main",
    "per_second",
    "plan_phases",
    "service_file",
    "summarize",
    "write",
]

SERVICE = "bench-scaleout"
SCOPE = "bench-scaleout"  # `tidegate up --scope`: its containers carry tidegate.scope=this
CONTAINER_PORT = 8080
_SCOPE_LABEL = "tidegate.scope"  # scaler.daemon.LABEL_SCOPE
_SERVICE_LABEL = "tidegate.service"  # scaler.runtime.LABEL_SERVICE

# phase names, in the order they run
LEAD, STEP_PHASE, COOL_DOWN, RAMP_PHASE, TAIL = "idle", "step", "cool-down", "ramp", "tail"

_DEFAULTS: dict[str, Any] = {
    "max_concurrency": 4,
    "max_size": 6,
    "load_factor": 5,  # clients = this x max_concurrency unless --clients is given
    "hold": "50ms",
    "lead": "3s",
    "step": "20s",
    "cool_down": "5s",
    "ramp": "20s",
    "tail": "5s",
    "scale_down_delay": "3s",
    "queue_timeout": "60s",
    "request_timeout": "30s",
    "sample_interval": "250ms",
}
# The cool-down waits at most this long past --cool-down for zero instances. With --no-pause
# that takes Knative's panic hold (60 s after the burst, scaler.window.STABLE_WINDOW) plus
# scale_down_delay plus the instances' stop.
_COOL_DOWN_MAX_EXTRA_S = 90.0
_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
_READY_TIMEOUT_S = 30.0  # tidegate up until /-/ready is 200 and the service is listed
_STATUS_TIMEOUT_S = 2.0  # one status call to the scaler
_MAX_LISTED_FAILURES = 200  # failed requests listed one by one in the JSON


# --- the pure parts ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """The scaler's view of the service at `t` (seconds since the run's start), with the
    number of clients running then; None where the status call failed (`error` says why)."""

    t: float
    clients: int
    ready: int | None = None
    starting: int | None = None
    draining: int | None = None
    desired: int | None = None
    queued: int | None = None
    inflight: int | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Second:
    """One second of the run, [t, t+1): the requests that completed in it and the scaler's
    view. Latencies are of the successful responses; ready, starting, draining and desired
    are the second's last sample, queued and in-flight its highest (queues are brief)."""

    t: int
    phase: str
    clients: int | None
    requests: int
    ok: int
    errors: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    ready: int | None
    starting: int | None
    draining: int | None
    desired: int | None
    queued: int | None
    inflight: int | None

    @property
    def failed(self) -> int:
        return self.requests - self.ok


@dataclass(frozen=True, slots=True)
class PhaseSummary:
    """One phase's figures; latencies in ms (None without a successful response), times in
    seconds from the phase's start (None when it never happened).

    `capacity_s`: when ready x max_concurrency first covered the phase's peak clients;
    `steady_*`: the requests started from then on, i.e. without waiting for instances."""

    name: str
    kind: str
    start_s: float
    duration_s: float
    clients: int
    requests: int
    ok: int
    errors: dict[str, int]
    throughput: float  # successful responses per second over the phase
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    max_ready: int | None
    max_starting: int | None
    max_queued: int | None
    first_ready_s: float | None
    capacity_s: float | None
    steady_requests: int
    steady_throughput: float | None
    steady_p50_ms: float | None
    steady_p99_ms: float | None

    @property
    def failed(self) -> int:
        return self.requests - self.ok

    @property
    def loaded(self) -> bool:
        return self.kind != IDLE


@dataclass(frozen=True, slots=True)
class Summary:
    """The whole run: totals, and each phase."""

    duration_s: float
    requests: int
    ok: int
    errors: dict[str, int]
    max_ready: int | None
    max_starting: int | None
    max_queued: int | None
    phases: list[PhaseSummary]

    @property
    def failed(self) -> int:
        return self.requests - self.ok

    def phase(self, name: str) -> PhaseSummary | None:
        return next((p for p in self.phases if p.name == name), None)


@dataclass(frozen=True, slots=True)
class Gates:
    """SLO gates; None means not set. Durations in seconds.

    - max_errors: failed requests over the whole run.
    - max_p99_s: the p99 of every step and ramp phase, cold starts included.
    - max_steady_p99_s: the p99 of each step phase once its capacity was ready.
    - max_time_to_capacity_s: each step phase's time to the capacity its load needs.
    - min_throughput: each step phase's successful responses/s once its capacity was ready.
    """

    max_errors: int | None = None
    max_p99_s: float | None = None
    max_steady_p99_s: float | None = None
    max_time_to_capacity_s: float | None = None
    min_throughput: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in self.__slots__}


def plan_phases(
    clients: int, lead_s: float, step_s: float, cool_down_s: float, ramp_s: float, tail_s: float
) -> list[Phase]:
    """idle, step, cool-down, ramp, tail; a phase of 0 s is left out (the cool-down too when
    there is no step or no ramp to separate)."""
    phases = [
        Phase(LEAD, IDLE, lead_s),
        Phase(STEP_PHASE, STEP, step_s, clients),
        Phase(COOL_DOWN, IDLE, cool_down_s),
        Phase(RAMP_PHASE, RAMP, ramp_s, clients),
        Phase(TAIL, IDLE, tail_s),
    ]
    if step_s <= 0 or ramp_s <= 0:
        phases = [p for p in phases if p.name != COOL_DOWN]
    kept = [p for p in phases if p.duration_s > 0]
    if not any(p.kind != IDLE for p in kept):
        raise ValueError("nothing to run: both the step and the ramp are 0 s")
    return kept


def _phase_at(spans: Sequence[Span], t: float) -> str:
    """The phase running at `t` (the last one begun, past the end)."""
    for span in spans:
        if span.contains(t):
            return span.name
    before = [s for s in spans if s.start <= t]
    return before[-1].name if before else (spans[0].name if spans else "")


def _latencies(records: Iterable[RequestRecord]) -> list[float]:
    return [r.ms for r in records if r.ok]


def _pct(values: Sequence[float], q: float) -> float | None:
    return percentile(values, q) if values else None


def _max_of(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _error_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    counts = Counter(r.error for r in records if r.error is not None)
    return dict(sorted(counts.items()))


def per_second(
    records: Sequence[RequestRecord],
    samples: Sequence[Sample],
    spans: Sequence[Span],
    end_s: float,
) -> list[Second]:
    """The run as one row per second, requests by the second they completed in."""
    n = max(1, math.ceil(end_s))
    done: list[list[RequestRecord]] = [[] for _ in range(n)]
    for r in records:
        done[min(n - 1, max(0, int(r.end)))].append(r)
    seen: list[list[Sample]] = [[] for _ in range(n)]
    for s in samples:
        if 0 <= s.t < n:
            seen[int(s.t)].append(s)
    rows = []
    for t in range(n):
        recs, got = done[t], [s for s in seen[t] if s.error is None]
        last = got[-1] if got else None
        lat = _latencies(recs)
        rows.append(
            Second(
                t=t,
                phase=_phase_at(spans, t + 0.5),  # the phase in the middle of the second
                clients=seen[t][-1].clients if seen[t] else None,
                requests=len(recs),
                ok=len(lat),
                errors=_error_counts(recs),
                p50_ms=_pct(lat, 50),
                p99_ms=_pct(lat, 99),
                max_ms=max(lat) if lat else None,
                ready=last.ready if last else None,
                starting=last.starting if last else None,
                draining=last.draining if last else None,
                desired=last.desired if last else None,
                queued=_max_of(s.queued for s in got),
                inflight=_max_of(s.inflight for s in got),
            )
        )
    return rows


def _summarize_phase(
    span: Span, records: Sequence[RequestRecord], samples: Sequence[Sample], max_concurrency: int
) -> PhaseSummary:
    inside = [s for s in samples if span.contains(s.t) and s.error is None]
    duration = span.end - span.start
    lat = _latencies(records)

    def first(pred: Callable[[Sample], bool]) -> float | None:
        return next((s.t - span.start for s in inside if pred(s)), None)

    # both only for a loaded phase: in an idle one, ready instances are the previous load's
    loaded = span.kind != IDLE
    first_ready = first(lambda s: (s.ready or 0) >= 1) if loaded else None
    capacity = first(lambda s: (s.ready or 0) * max_concurrency >= span.clients) if loaded else None
    steady: list[RequestRecord] = []
    steady_tp: float | None = None
    if capacity is not None:
        since = span.start + capacity
        steady = [r for r in records if r.start >= since]
        ends = [r.end for r in steady]
        # over the time the steady requests ran, not the phase's nominal end
        window = (max(ends) - since) if ends else 0.0
        steady_tp = sum(1 for r in steady if r.ok) / window if window > 0 else None
    steady_lat = _latencies(steady)
    return PhaseSummary(
        name=span.name,
        kind=span.kind,
        start_s=span.start,
        duration_s=duration,
        clients=span.clients,
        requests=len(records),
        ok=len(lat),
        errors=_error_counts(records),
        throughput=len(lat) / duration if duration > 0 else 0.0,
        p50_ms=_pct(lat, 50),
        p99_ms=_pct(lat, 99),
        max_ms=max(lat) if lat else None,
        max_ready=_max_of(s.ready for s in inside),
        max_starting=_max_of(s.starting for s in inside),
        max_queued=_max_of(s.queued for s in inside),
        first_ready_s=first_ready,
        capacity_s=capacity,
        steady_requests=len(steady),
        steady_throughput=steady_tp,
        steady_p50_ms=_pct(steady_lat, 50),
        steady_p99_ms=_pct(steady_lat, 99),
    )


def summarize(
    records: Sequence[RequestRecord],
    samples: Sequence[Sample],
    spans: Sequence[Span],
    max_concurrency: int,
    end_s: float,
) -> Summary:
    """Totals and per-phase figures; a request counts in the phase it started in."""
    by_phase: dict[str, list[RequestRecord]] = {}
    for r in records:
        by_phase.setdefault(r.phase, []).append(r)
    good = [s for s in samples if s.error is None]
    return Summary(
        duration_s=end_s,
        requests=len(records),
        ok=sum(1 for r in records if r.ok),
        errors=_error_counts(records),
        max_ready=_max_of(s.ready for s in good),
        max_starting=_max_of(s.starting for s in good),
        max_queued=_max_of(s.queued for s in good),
        phases=[
            _summarize_phase(span, by_phase.get(span.name, []), samples, max_concurrency)
            for span in spans
        ],
    )


def _ms_text(seconds: float) -> str:
    return f"{seconds * 1000:g} ms"


def _errors_text(errors: Mapping[str, int]) -> str:
    return ", ".join(f"{kind}: {n}" for kind, n in errors.items()) or "none"


def check_gates(summary: Summary, gates: Gates) -> list[str]:
    """One message per missed gate. A gate that cannot be evaluated (no such phase, no
    successful response, capacity never reached) counts as missed."""
    missed: list[str] = []
    loaded = [p for p in summary.phases if p.loaded]
    steps = [p for p in summary.phases if p.kind == STEP]
    if gates.max_errors is not None and summary.failed > gates.max_errors:
        missed.append(
            f"--max-errors {gates.max_errors}: {summary.failed} of {summary.requests} requests "
            f"failed ({_errors_text(summary.errors)})"
        )
    if gates.max_p99_s is not None:
        flag = f"--max-p99 {_ms_text(gates.max_p99_s)}"
        if not loaded:
            missed.append(f"{flag}: no step or ramp phase ran")
        for p in loaded:
            if p.p99_ms is None:
                missed.append(f"{flag}: {p.name} had no successful response")
            elif p.p99_ms > gates.max_p99_s * 1000:
                missed.append(f"{flag}: {p.name} p99 was {p.p99_ms:.1f} ms")
    step_gates: list[tuple[str, float | None, Callable[[PhaseSummary, float], str | None]]] = [
        (
            f"--max-steady-p99 {_ms_text(gates.max_steady_p99_s or 0)}",
            gates.max_steady_p99_s,
            lambda p, limit: (
                None
                if p.steady_p99_ms is not None and p.steady_p99_ms <= limit * 1000
                else f"steady p99 was {_ms_or_dash(p.steady_p99_ms)} ms"
            ),
        ),
        (
            f"--max-time-to-capacity {gates.max_time_to_capacity_s or 0:g}s",
            gates.max_time_to_capacity_s,
            lambda p, limit: (
                None
                if p.capacity_s is not None and p.capacity_s <= limit
                else f"time to capacity was {_s_or_never(p.capacity_s)}"
            ),
        ),
        (
            f"--min-throughput {gates.min_throughput or 0:g}",
            gates.min_throughput,
            lambda p, limit: (
                None
                if p.steady_throughput is not None and p.steady_throughput >= limit
                else f"steady throughput was {_num_or_dash(p.steady_throughput)} req/s"
            ),
        ),
    ]
    for flag, limit, judge in step_gates:
        if limit is None:
            continue
        if not steps:
            missed.append(f"{flag}: no step phase ran")
        for p in steps:
            verdict = judge(p, limit)
            if verdict is not None:
                missed.append(f"{flag}: {p.name} {verdict}")
    return missed


def service_file(
    image: str,
    *,
    max_size: int,
    max_concurrency: int,
    scale_down_delay_s: float,
    queue_timeout_s: float,
) -> str:
    """The benchmark service: `image` from zero, a TCP health check (the default), a long
    queue timeout so that held requests wait out any cold start."""
    return (
        f"name: {SERVICE}\n"
        "runtime: docker\n"
        f"image: {json.dumps(image)}\n"
        f"port: {CONTAINER_PORT}\n"
        "autoscaling:\n"
        "  min_size: 0\n"
        f"  max_size: {max_size}\n"
        f"  max_concurrency: {max_concurrency}\n"
        f"  scale_down_delay: {_duration(scale_down_delay_s)}\n"
        "queue:\n"
        "  max_length: 1000\n"
        f"  timeout: {_duration(queue_timeout_s)}\n"
        "health_check:\n"
        "  protocol: tcp\n"
    )


def _duration(seconds: float) -> str:
    """A duration as a service file writes it: whole seconds as "3s", else "250ms"."""
    return f"{seconds:g}s" if seconds == int(seconds) else f"{seconds * 1000:g}ms"


# --- formatting ----------------------------------------------------------------------------


def _ms_or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _s_or_never(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def _num_or_dash(value: float | int | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


_PHASE_COLUMNS = (
    "phase",
    "s",
    "clients",
    "requests",
    "failed",
    "req/s",
    "p50 ms",
    "p99 ms",
    "max ms",
    "ready max",
    "queued max",
    "1st ready s",
    "capacity s",
    "steady req/s",
    "steady p99 ms",
)


def _phase_cells(p: PhaseSummary) -> list[str]:
    return [
        p.name,
        f"{p.duration_s:.1f}",
        str(p.clients) if p.loaded else "-",
        str(p.requests),
        str(p.failed),
        f"{p.throughput:.0f}",
        _ms_or_dash(p.p50_ms),
        _ms_or_dash(p.p99_ms),
        _ms_or_dash(p.max_ms),
        _num_or_dash(p.max_ready, "d"),
        _num_or_dash(p.max_queued, "d"),
        _num_or_dash(p.first_ready_s, ".2f"),
        _num_or_dash(p.capacity_s, ".2f"),
        _num_or_dash(p.steady_throughput),
        _ms_or_dash(p.steady_p99_ms),
    ]


def headline(summary: Summary, max_concurrency: int) -> str:
    """The line the issue asks about: failed requests, overall and in the step."""
    step = summary.phase(STEP_PHASE)
    text = f"failed requests: {summary.failed} of {summary.requests}"
    if summary.failed:
        text += f" ({_errors_text(summary.errors)})"
    if step is not None:
        factor = step.clients / max_concurrency
        text += (
            f"; in the step from idle to {step.clients} clients ({factor:g} x max_concurrency "
            f"{max_concurrency}): {step.failed} of {step.requests}"
        )
    return text


def format_summary(summary: Summary, max_concurrency: int) -> str:
    """The fixed-width per-phase table printed at the end, and the headline."""
    body = [_phase_cells(p) for p in summary.phases]
    widths = [max(len(row[i]) for row in (_PHASE_COLUMNS, *body)) for i in range(len(body[0]))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "  ".join((first, *rest)).rstrip()

    out = [line(_PHASE_COLUMNS), line(["-" * w for w in widths]), *(line(r) for r in body), ""]
    out.append(headline(summary, max_concurrency))
    out.append(
        f"instances at most: {_num_or_dash(summary.max_ready, 'd')} ready, "
        f"{_num_or_dash(summary.max_starting, 'd')} starting; "
        f"queued at most: {_num_or_dash(summary.max_queued, 'd')}"
    )
    return "\n".join(out)


def progress_line(second: Second) -> str:
    """One second, as printed while the run goes on."""
    errors = f" errors {_errors_text(second.errors)}" if second.errors else ""
    return (
        f"t={second.t:>3} {second.phase:<9} clients {_num_or_dash(second.clients, 'd'):>3}  "
        f"{second.ok:>4} ok/s  p50 {_ms_or_dash(second.p50_ms):>7}  "
        f"p99 {_ms_or_dash(second.p99_ms):>7} ms  ready {_num_or_dash(second.ready, 'd')} "
        f"starting {_num_or_dash(second.starting, 'd')} queued "
        f"{_num_or_dash(second.queued, 'd')}{errors}"
    )


@dataclass(frozen=True, slots=True)
class RunData:
    """What one run collected, before analysis."""

    records: list[RequestRecord]
    samples: list[Sample]
    spans: list[Span]
    end_s: float
    server: dict[str, Any] = field(default_factory=dict)  # the ingress's and scaler's own counts
    scale_events: list[dict[str, Any]] = field(default_factory=list)
    cold_starts: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ScaleoutReport:
    """Everything one `bench scaleout` run produced, ready to be written out."""

    started_at: datetime
    machine: dict[str, Any]
    settings: dict[str, Any]
    commands: dict[str, list[str]]
    service_file: str
    run: RunData
    summary: Summary
    seconds: list[Second]
    gates: Gates
    missed: list[str] = field(default_factory=list)
    plot: str | None = None  # the PNG's file name, beside the JSON

    def stamp(self) -> str:
        """UTC timestamp used in the file names, e.g. 20250101T120000Z."""
        return self.started_at.strftime("%Y%m%dT%H%M%SZ")

    def to_json(self) -> dict[str, Any]:
        failures = [r for r in self.run.records if not r.ok]
        return {
            "benchmark": "scaleout",
            "date": self.started_at.isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": self.settings,
            "commands": {name: report._shell(argv) for name, argv in self.commands.items()},
            "service_file": self.service_file,
            "summary": _rounded(
                {
                    **{k: v for k, v in asdict(self.summary).items() if k != "phases"},
                    "failed": self.summary.failed,
                    "headline": headline(self.summary, self.settings["max_concurrency"]),
                }
            ),
            "phases": [_rounded({**asdict(p), "failed": p.failed}) for p in self.summary.phases],
            "spans": [_rounded(asdict(s)) for s in self.run.spans],
            "series": [_rounded({**asdict(s), "failed": s.failed}) for s in self.seconds],
            "failures": [_rounded(asdict(r)) for r in failures[:_MAX_LISTED_FAILURES]],
            "failures_listed": min(len(failures), _MAX_LISTED_FAILURES),
            "server": self.run.server,
            "scale_events": self.run.scale_events,
            "cold_starts": self.run.cold_starts,
            "samples": [_rounded(asdict(s)) for s in self.run.samples],
            "gates": {**self.gates.as_dict(), "missed": self.missed},
            "plot": self.plot,
        }


def _rounded(value: Any) -> Any:
    """Floats to 3 decimals (ms to the microsecond, s to the millisecond), recursively."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]], text_cols: int = 1) -> list[str]:
    """A Markdown table: the first `text_cols` columns left-aligned, the rest (numbers)
    right-aligned; a negative `text_cols` left-aligns all but the first -text_cols."""
    left = [i < text_cols if text_cols >= 0 else i >= -text_cols for i in range(len(head))]
    lines = ["| " + " | ".join(head) + " |"]
    lines.append("|" + "|".join("---" if is_left else "--:" for is_left in left) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def format_markdown(rep: ScaleoutReport) -> str:
    """The report as a Markdown page: context, per phase, the plot, per second, failures."""
    m, s, st = rep.machine, rep.summary, rep.settings
    v = m["versions"]
    lines = [
        f"# Scale-out benchmark, {rep.started_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        f"- CPU: {m['cpu_model']}, nproc {m['nproc']}",
        f"- kernel {m['kernel']}; Docker Engine {v['docker_engine']} (SDK {v['docker_sdk']}); "
        f"Python {v['python']}; tidegate {v['tidegate_commit']}",
        f"- service `{SERVICE}`: min_size 0, max_size {st['max_size']}, max_concurrency "
        f"{st['max_concurrency']}, scale_down_delay {st['scale_down_delay']}, queue timeout "
        f"{st['queue_timeout']}; each request `GET {st['path']}` (held {st['hold']})",
        f"- load: {st['clients']} closed-loop keep-alive clients at the peak; phases "
        + ", ".join(f"{p['name']} {p['duration_s']:g} s" for p in st["phases"])
        + (
            " (the cool-down lasts until zero instances, reached by itself)"
            if st.get("cool_down", "").startswith("until")
            else " (then the service is paused and resumed, and the cool-down lasts until zero "
            "instances, so the ramp starts cold too)"
        ),
        "",
        f"**{headline(s, st['max_concurrency'])}.** Instances at most: "
        f"{_num_or_dash(s.max_ready, 'd')} ready; queued at most: "
        f"{_num_or_dash(s.max_queued, 'd')}.",
        "",
        "## Per phase",
        "",
    ]
    lines += _md_table(_PHASE_COLUMNS, (_phase_cells(p) for p in s.phases))
    lines += [
        "",
        "A request counts in the phase it started in. `capacity s`: from the phase's start to "
        "the first sample with ready x max_concurrency >= its clients; `steady`: the requests "
        "started from then on. Latencies are of successful responses, from the request's "
        "first byte written (or its connect) to the response's last byte read.",
        "",
    ]
    if rep.plot:
        lines += ["## Plot", "", f"![load, instances, p99 and queue]({rep.plot})", ""]
    lines += ["## SLO gates", ""]
    set_gates = {k: g for k, g in rep.gates.as_dict().items() if g is not None}
    if not set_gates:
        lines.append("none set")
    else:
        lines.append(", ".join(f"{k} = {g:g}" for k, g in set_gates.items()))
        lines += [""] + ([f"- MISSED: {msg}" for msg in rep.missed] or ["- all passed"])
    lines += ["", "## Every second", ""]
    head = (
        *("t", "phase", "clients", "ok/s", "failed", "p50 ms", "p99 ms"),
        *("ready", "starting", "desired", "queued", "in flight"),
    )
    rows = [
        (
            str(x.t),
            x.phase,
            _num_or_dash(x.clients, "d"),
            str(x.ok),
            f"{x.failed} ({_errors_text(x.errors)})" if x.failed else "0",
            _ms_or_dash(x.p50_ms),
            _ms_or_dash(x.p99_ms),
            *(_num_or_dash(n, "d") for n in (x.ready, x.starting, x.desired)),
            *(_num_or_dash(n, "d") for n in (x.queued, x.inflight)),
        )
        for x in rep.seconds
    ]
    lines += _md_table(head, rows, text_cols=2)
    lines += [
        "",
        "Requests by the second they completed in; ready, starting and desired as last "
        "sampled in that second, queued and in flight the highest sample.",
        "",
    ]
    failures = [r for r in rep.run.records if not r.ok]
    if failures:
        lines += ["## Failed requests", ""]
        lines += _md_table(
            ("phase", "start s", "end s", "kind", "detail"),
            (
                (r.phase, f"{r.start:.3f}", f"{r.end:.3f}", r.error or "", r.detail[:120])
                for r in failures[:50]
            ),
        )
        if len(failures) > 50:
            lines.append(f"\n... and {len(failures) - 50} more (the JSON lists up to 200)")
        lines.append("")
    if rep.run.server:
        lines += ["## tidegate's own counts", "", "```json"]
        lines += [json.dumps(rep.run.server, indent=2), "```", ""]
    if rep.run.scale_events:
        lines += ["## Scale events (the scaler's last ten)", ""]
        lines += _md_table(
            ("t s", "direction", "desired", "reason"),
            (
                (
                    f"{e['t']:.1f}",
                    e["direction"],
                    f"{e['from_desired']} -> {e['to_desired']}",
                    e["reason"],
                )
                for e in rep.run.scale_events
            ),
            text_cols=-1,
        )
        lines.append("")
    lines += report.commands_markdown(rep.commands, SERVICE, rep.service_file)
    return "\n".join(lines) + "\n"


def write(rep: ScaleoutReport, out_dir: Path) -> tuple[Path, Path]:
    """Write scaleout-<stamp>.json and .md into `out_dir`; return their paths."""
    return report.write_pair(
        out_dir, f"scaleout-{rep.stamp()}", rep.to_json(), format_markdown(rep)
    )


def server_counts(metrics_text: str, service: str = SERVICE) -> dict[str, Any]:
    """The ingress's and scaler's own counts for `service` from a /metrics page: responses
    by code class, upstream errors by kind, held requests, cold starts, scale events."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "tidegate_requests_total": "code_class",
        "tidegate_upstream_errors_total": "kind",
        "tidegate_scale_events_total": "direction",
    }
    counts: dict[str, Any] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.labels.get("service") != service:
                continue
            if sample.name in wanted:
                by = counts.setdefault(sample.name, {})
                key = sample.labels.get(wanted[sample.name], "")
                by[key] = by.get(key, 0) + int(sample.value)
            elif sample.name in (
                "tidegate_queue_wait_seconds_count",
                "tidegate_cold_start_seconds_count",
            ):
                counts[sample.name] = int(sample.value)
    return counts


# --- the shell: Docker, tidegate, the load and the sampler ---------------------------------


def _start_tidegate(ws: procs.Workspace, service_path: Path) -> procs.TidegateUp:
    return procs.start_tidegate_up(ws, service_path, SCOPE, _READY_TIMEOUT_S)


def _ours(client: Any) -> list[Any]:
    found = client.containers.list(
        all=True, filters={"label": [f"{_SCOPE_LABEL}={SCOPE}"]}, ignore_removed=True
    )
    return list(found)


def _remove_ours(client: Any) -> None:
    """Force-remove every container of the bench's scope; never raises."""
    try:
        for container in _ours(client):
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)
    except Exception as exc:
        print(f"bench scaleout: cleanup: listing containers failed: {exc}", file=sys.stderr)


@contextlib.contextmanager
def _cleanup_deferred(client: Any) -> Iterator[None]:
    try:
        yield
    finally:
        with procs._signals_deferred():
            _remove_ours(client)


def _sample_from(t: float, clients: int, status: Any) -> Sample:
    return Sample(
        t=t,
        clients=clients,
        ready=status.ready,
        starting=status.starting,
        draining=status.draining,
        desired=status.desired,
        queued=status.queued,
        inflight=status.inflight,
    )


async def _status(api: Any) -> Any:
    report_ = await api.status(SERVICE)
    (status,) = report_.services
    return status


async def _wait_listed(api: Any, tg: procs.TidegateUp) -> None:
    """Until the scaler's API answers with the service, at zero instances."""
    from ingress.control import ControlError

    deadline = time.monotonic() + _READY_TIMEOUT_S
    last = ""
    while True:
        tg.check_alive()
        try:
            status = await _status(api)
            if status.ready + status.starting + status.draining == 0:
                return
            last = f"{status.ready} ready, {status.starting} starting"
        except (ControlError, ValueError) as exc:
            last = str(exc)
        if time.monotonic() >= deadline:
            raise procs.StartError(f"{SERVICE} not listed at zero instances: {last}")
        await asyncio.sleep(0.1)


async def _sampler(
    api: Any,
    gen: LoadGenerator,
    samples: list[Sample],
    interval_s: float,
    tg: procs.TidegateUp,
    on_second: Callable[[int], None],
) -> None:
    """Every `interval_s`: the scaler's view; at each whole second, `on_second(previous)`."""
    k = 0
    second = 0
    while True:
        # the next tick on the grid; a slow status call skips ticks rather than bunching them
        k = max(k + 1, math.floor(gen.now() / interval_s) + 1)
        await asyncio.sleep(max(0.0, k * interval_s - gen.now()))
        tg.check_alive()
        t, clients = gen.now(), gen.active
        try:
            async with asyncio.timeout(_STATUS_TIMEOUT_S):
                samples.append(_sample_from(t, clients, await _status(api)))
        except Exception as exc:  # a slow or failed call is a gap in the series, not the end
            samples.append(Sample(t=t, clients=clients, error=f"{type(exc).__name__}: {exc}"))
        while int(gen.now()) > second:
            on_second(second)
            second += 1


async def _scrape_metrics(port: int) -> str:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return await resp.text()


async def _drive(
    tg: procs.TidegateUp, phases: Sequence[Phase], args: argparse.Namespace
) -> RunData:
    """The run: wait for the service at zero, then the phases with the sampler beside them."""
    from scaler.api import ScalerClient

    api = ScalerClient(tg.socket, timeout=_STATUS_TIMEOUT_S)
    gen = LoadGenerator(
        "127.0.0.1", tg.port, _path(args.hold), request_timeout_s=args.request_timeout
    )
    samples: list[Sample] = []
    printed = 0  # records already shown in a progress line

    def show(second: int) -> None:
        nonlocal printed
        recs = gen.records
        end = printed
        while end < len(recs) and recs[end].end < second + 1:
            end += 1
        rows = per_second(recs[printed:end], samples, gen.spans, second + 1)
        printed = end
        # the phase running now: gen.spans lists only the phases that have ended
        row = dataclasses.replace(rows[second], phase=gen.phase)
        print(progress_line(row), file=sys.stderr, flush=True)

    try:
        await _wait_listed(api, tg)
        gen.start()

        def at_zero() -> bool:
            last = next((s for s in reversed(samples) if s.error is None), None)
            return (
                last is not None
                and (last.ready or 0) + (last.starting or 0) + (last.draining or 0) == 0
            )

        async def pause_and_resume() -> None:
            # `tidegate pause` stops every instance now and forgets the load seen so far
            # (decide()'s state and windows); `resume` goes back to min_size 0, so the ramp
            # meets the service as the step did
            await api.pause(SERVICE)
            await api.resume(SERVICE)

        async def run_phases() -> None:
            for phase in phases:
                if phase.name == COOL_DOWN:
                    then = None if args.no_pause else pause_and_resume
                    await gen.run_phase(phase, at_zero, _COOL_DOWN_MAX_EXTRA_S, then)
                else:
                    await gen.run_phase(phase)

        sampler = asyncio.create_task(_sampler(api, gen, samples, args.sample_interval, tg, show))
        driver = asyncio.create_task(run_phases())
        try:
            await asyncio.wait({sampler, driver}, return_when=asyncio.FIRST_COMPLETED)
            if sampler.done():  # it ends only by an exception: tidegate died
                driver.cancel()
                sampler.result()
            await driver
        finally:
            for task in (sampler, driver):
                task.cancel()
            await asyncio.gather(sampler, driver, return_exceptions=True)
        end_s = gen.now()
        final = await _status(api)
        metrics = await _scrape_metrics(tg.metrics_port)
    finally:
        await gen.close()
        await api.close()
    return RunData(
        records=list(gen.records),
        samples=samples,
        spans=list(gen.spans),
        end_s=end_s,
        server=server_counts(metrics),
        scale_events=[_at(e, end_s) for e in reversed(final.recent_scale_events)],
        cold_starts=[_at(c, end_s) for c in reversed(final.recent_cold_starts)],
    )


def _at(event: Any, end_s: float) -> dict[str, Any]:
    """A scale event or cold start from the final status, timed in seconds since the start
    (the status says how long ago, as of `end_s`)."""
    import msgspec

    fields: dict[str, Any] = msgspec.to_builtins(event)
    ago = fields.pop("ago_seconds")
    return {"t": round(end_s - ago, 3), **fields}


def _run_async(coro_fn: Callable[[], Any]) -> Any:
    """Run on uvloop (the loop tidegate's ingress runs on), the default loop without it."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro_fn())


def _path(hold_s: float) -> str:
    return f"/cgi-bin/slow?ms={round(hold_s * 1000)}"


def _keep_logs(ws: procs.Workspace, dest: Path) -> Path | None:
    """Copy tidegate's log and the service's logs out of the workspace (before it goes)."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ws.path("tidegate.log"), dest / "tidegate.log")
        logs = ws.path("state", "logs", SERVICE)
        if logs.is_dir():
            shutil.copytree(logs, dest / SERVICE, dirs_exist_ok=True)
    except OSError as exc:
        print(f"bench scaleout: could not keep the logs: {exc}", file=sys.stderr)
        return None
    return dest


# --- flags ---------------------------------------------------------------------------------


def _duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_duration(text: str) -> float:
    value = _duration_arg(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 (got {text})")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `scaleout` subcommand's flags."""
    d = _DEFAULTS
    service = parser.add_argument_group("the service")
    service.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=d["max_concurrency"],
        metavar="N",
        help="requests one instance takes at once (default %(default)s)",
    )
    service.add_argument(
        "--max-size",
        type=positive_int,
        default=d["max_size"],
        metavar="N",
        help="instances at most (default %(default)s)",
    )
    service.add_argument(
        "--scale-down-delay",
        type=_duration_arg,
        default=d["scale_down_delay"],
        metavar="D",
        help="idle time before instances go (default %(default)s)",
    )
    service.add_argument(
        "--queue-timeout",
        type=_positive_duration,
        default=d["queue_timeout"],
        metavar="D",
        help="how long tidegate holds a request before a 503 (default %(default)s)",
    )
    load = parser.add_argument_group("the load")
    load.add_argument(
        "--clients",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"clients at the peak of the step and the ramp "
        f"(default {d['load_factor']} x --max-concurrency)",
    )
    load.add_argument(
        "--hold",
        type=_duration_arg,
        default=d["hold"],
        metavar="D",
        help="how long the instance holds each request (default %(default)s)",
    )
    for flag, key, what in (
        ("--lead", "lead", "idle before the step"),
        ("--step", "step", "the step's length; 0 to leave it out"),
        (
            "--cool-down",
            "cool_down",
            "idle after the step, at least; then the service is paused and resumed, and the "
            "cool-down goes on until it is at zero instances",
        ),
        ("--ramp", "ramp", "the ramp's length, from 0 to --clients; 0 to leave it out"),
        ("--tail", "tail", "idle after the ramp, to see the scale-down begin"),
    ):
        load.add_argument(
            flag,
            type=_duration_arg,
            default=d[key],
            metavar="D",
            help=f"{what} (default %(default)s)",
        )
    load.add_argument(
        "--no-pause",
        action="store_true",
        help="let the scaler take the service to zero by itself after the step (it keeps "
        "a burst's instances for 60 s, as Knative's panic mode does): a cool-down of about "
        "65 s instead of a few",
    )
    load.add_argument(
        "--request-timeout",
        type=_positive_duration,
        default=d["request_timeout"],
        metavar="D",
        help="a client gives up on a request after this; counted as `timeout` "
        "(default %(default)s)",
    )
    load.add_argument(
        "--sample-interval",
        type=_positive_duration,
        default=d["sample_interval"],
        metavar="D",
        help="how often the scaler's status is read (default %(default)s)",
    )
    out = parser.add_argument_group("results")
    out.add_argument(
        "--out",
        type=Path,
        default=_DEFAULT_OUT,
        metavar="DIR",
        help="where the JSON, Markdown and PNG go (default bench/results)",
    )
    out.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    gates = parser.add_argument_group("SLO gates (exit 1 when one is missed)")
    gates.add_argument(
        "--max-errors",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="failed requests over the whole run, at most",
    )
    gates.add_argument(
        "--max-p99",
        type=_positive_duration,
        default=None,
        metavar="D",
        help="p99 of the step and of the ramp, cold starts included, at most (e.g. 2s)",
    )
    gates.add_argument(
        "--max-steady-p99",
        type=_positive_duration,
        default=None,
        metavar="D",
        help="p99 of the step once its instances were ready, at most (e.g. 150ms)",
    )
    gates.add_argument(
        "--max-time-to-capacity",
        type=_positive_duration,
        default=None,
        metavar="D",
        help="from the step to enough ready instances for its load, at most (e.g. 3s)",
    )
    gates.add_argument(
        "--min-throughput",
        type=float,
        default=None,
        metavar="RPS",
        help="successful responses/s in the step once its instances were ready, at least",
    )


def gates_from(args: argparse.Namespace) -> Gates:
    return Gates(
        max_errors=args.max_errors,
        max_p99_s=args.max_p99,
        max_steady_p99_s=args.max_steady_p99,
        max_time_to_capacity_s=args.max_time_to_capacity,
        min_throughput=args.min_throughput,
    )


def _clients(args: argparse.Namespace) -> int:
    return int(args.clients or _DEFAULTS["load_factor"] * args.max_concurrency)


def main(args: argparse.Namespace) -> int:
    """Run the phases, print and save the results; 1 if an SLO gate was missed, else 0."""
    # argparse applies `type` to string defaults too, so every duration is in seconds here
    clients = _clients(args)
    phases = plan_phases(clients, args.lead, args.step, args.cool_down, args.ramp, args.tail)
    started_at = datetime.now(UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    client = coldstart._docker_client()
    import docker.errors
    import requests.exceptions

    kept_logs: Path | None = None
    try:
        engine = str(client.version().get("Version", "unknown"))
        image = coldstart._build_image(client)
        text = service_file(
            image,
            max_size=args.max_size,
            max_concurrency=args.max_concurrency,
            scale_down_delay_s=args.scale_down_delay,
            queue_timeout_s=args.queue_timeout,
        )
        with _cleanup_deferred(client):
            _remove_ours(client)  # left by a run that was killed
            # Leaving the workspace stops tidegate (which stops its instances) first; the
            # cleanup above then removes whatever is left of the scope's containers.
            with procs.Workspace(prefix="tidegate-bench-scaleout-") as ws:
                service_path = ws.write(f"{SERVICE}.yaml", text)
                print(f"bench scaleout: image {image}; starting tidegate up", file=sys.stderr)
                tg = _start_tidegate(ws, service_path)
                argv = [a.replace(str(ws.dir), "<tmp>") for a in tg.proc.argv]
                plan = ", ".join(f"{p.name} {p.duration_s:g} s" for p in phases)
                print(f"bench scaleout: {clients} clients at the peak; {plan}", file=sys.stderr)
                run = _run_async(lambda: _drive(tg, phases, args))
                if any(not r.ok for r in run.records):
                    kept_logs = _keep_logs(ws, args.out / "tmp" / f"scaleout-{stamp}")
        machine = coldstart.machine_info(engine, docker.__version__)
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise procs.StartError(f"Docker engine error: {exc}") from exc
    finally:
        client.close()

    seconds = per_second(run.records, run.samples, run.spans, run.end_s)
    summary = summarize(run.records, run.samples, run.spans, args.max_concurrency, run.end_s)
    gates = gates_from(args)
    missed = check_gates(summary, gates)
    rep = ScaleoutReport(
        started_at=started_at,
        machine=machine,
        settings={
            "image": image,
            "service": SERVICE,
            "max_concurrency": args.max_concurrency,
            "max_size": args.max_size,
            "scale_down_delay": _duration(args.scale_down_delay),
            "queue_timeout": _duration(args.queue_timeout),
            "clients": clients,
            "hold": _duration(args.hold),
            "path": _path(args.hold),
            "phases": [asdict(p) for p in phases],
            "cool_down": "pause and resume, then until zero instances"
            if not args.no_pause
            else "until zero instances, by the scaler itself",
            "cool_down_max_extra_s": _COOL_DOWN_MAX_EXTRA_S,
            "request_timeout": _duration(args.request_timeout),
            "sample_interval": _duration(args.sample_interval),
            "load_generator": "bench.loadgen: closed-loop clients, HTTP/1.1 keep-alive, uvloop",
        },
        commands={"tidegate": argv},
        service_file=text,
        run=run,
        summary=summary,
        seconds=seconds,
        gates=gates,
        missed=missed,
    )
    plot_name = None
    if not args.no_plot:
        plot_name = _plot(rep, args.out)
    rep = ScaleoutReport(**{**_fields(rep), "plot": plot_name})
    print(format_summary(summary, args.max_concurrency))
    json_path, md_path = write(rep, args.out)
    print(f"\nwrote {json_path}\n      {md_path}")
    if plot_name:
        print(f"      {args.out / plot_name}")
    if kept_logs is not None:
        print(f"requests failed: tidegate's logs are kept in {kept_logs}", file=sys.stderr)
    for message in missed:
        print(f"SLO gate missed: {message}", file=sys.stderr)
    return 1 if missed else 0


def _fields(rep: ScaleoutReport) -> dict[str, Any]:
    return {name: getattr(rep, name) for name in ScaleoutReport.__slots__}


def _plot(rep: ScaleoutReport, out_dir: Path) -> str | None:
    """Draw the PNG beside the JSON; None (and a note) without matplotlib."""
    from bench import plot

    if not plot.available():
        print(
            "bench scaleout: matplotlib is not installed, so no plot (pip install -e '.[bench]')",
            file=sys.stderr,
        )
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scaleout-{rep.stamp()}.png"
    plot.plot_scaleout(rep.to_json(), path)
    return path.name
