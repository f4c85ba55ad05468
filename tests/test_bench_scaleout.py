"""The scale-out benchmark and its tools: the load generator, the pure analysis, the report,
the plot, `bench all`, the locust shapes and the wrk script.

Pure parts get made-up records and samples; the load generator runs against small asyncio
servers on 127.0.0.1 written to produce each error kind; locust and matplotlib tests skip
when the `bench` extra is not installed; the last test runs the whole benchmark with
Docker for a few seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from bench import all as bench_all
from bench import plot, scaleout
from bench.__main__ import build_parser
from bench.loadgen import IDLE, RAMP, STEP, LoadGenerator, Phase, RequestRecord, Span
from bench.scaleout import (
    Gates,
    RunData,
    Sample,
    ScaleoutReport,
    check_gates,
    format_markdown,
    format_summary,
    headline,
    per_second,
    plan_phases,
    server_counts,
    service_file,
    summarize,
)
from scaler.spec import load_service_files
from tests.conftest import BENCH_MACHINE

_REPO = Path(__file__).resolve().parent.parent


# --- phases --------------------------------------------------------------------------------


def test_step_runs_its_clients_for_its_whole_length() -> None:
    step = Phase("s", STEP, 2.0, 20)
    assert [step.clients_at(t) for t in (-0.1, 0.0, 0.5, 1.99, 2.0, 5.0)] == [0, 20, 20, 20, 0, 0]


def test_ramp_adds_one_client_every_duration_over_clients() -> None:
    ramp = Phase("r", RAMP, 10.0, 5)
    times = (0.0, 0.01, 2.0, 2.01, 4.5, 8.0, 8.01, 9.99, 10.0)
    assert [ramp.clients_at(t) for t in times] == [0, 1, 1, 2, 3, 4, 5, 5, 0]


def test_idle_has_no_clients() -> None:
    assert Phase("i", IDLE, 3.0).clients_at(1.0) == 0


@pytest.mark.parametrize(
    "fields",
    [("x", "burst", 1.0, 1), ("x", STEP, 1.0, 0), ("x", RAMP, -1.0, 3), ("x", IDLE, 1.0, -1)],
)
def test_phase_rejects_nonsense(fields: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        Phase(*fields)


def test_plan_phases() -> None:
    phases = plan_phases(20, 3, 20, 10, 20, 5)
    assert [(p.name, p.kind, p.duration_s, p.clients) for p in phases] == [
        ("idle", IDLE, 3, 0),
        ("step", STEP, 20, 20),
        ("cool-down", IDLE, 10, 0),
        ("ramp", RAMP, 20, 20),
        ("tail", IDLE, 5, 0),
    ]
    # no ramp: nothing to cool down for; no lead, no tail
    assert [p.name for p in plan_phases(8, 0, 5, 10, 0, 0)] == ["step"]
    assert [p.name for p in plan_phases(8, 1, 0, 10, 5, 1)] == ["idle", "ramp", "tail"]
    with pytest.raises(ValueError, match="nothing to run"):
        plan_phases(8, 1, 0, 1, 0, 1)


# --- per second and per phase --------------------------------------------------------------


def _ok(phase: str, start: float, ms: float) -> RequestRecord:
    return RequestRecord(phase, start, start + ms / 1000, 200)


def _failed(phase: str, start: float, kind: str, status: int | None = None) -> RequestRecord:
    return RequestRecord(phase, start, start + 0.01, status, kind, "why")


def _sample(t: float, clients: int, ready: int, starting: int = 0, queued: int = 0) -> Sample:
    return Sample(
        t=t,
        clients=clients,
        ready=ready,
        starting=starting,
        draining=0,
        desired=ready + starting,
        queued=queued,
        inflight=min(clients, ready * 4),
    )


# A made-up run: idle [0, 1), a step of 8 clients [1, 4) with max_concurrency 4 (so 2
# instances needed: 1 ready at 1.75 s, 2 at 2.25 s), an idle tail [4, 5).
_SPANS = [
    Span("idle", IDLE, 0.0, 1.0, 0),
    Span("step", STEP, 1.0, 4.0, 8),
    Span("tail", IDLE, 4.0, 5.0, 0),
]
_SAMPLES = [
    _sample(0.5, 0, 0),
    _sample(1.25, 8, 0, starting=1, queued=8),
    _sample(1.75, 8, 1, starting=1, queued=4),
    _sample(2.25, 8, 2, queued=0),
    _sample(2.75, 8, 2),
    Sample(t=3.25, clients=8, error="TimeoutError: "),
    _sample(3.75, 8, 2),
    _sample(4.5, 0, 2),
]
_RECORDS = [
    _ok("step", 1.0, 900.0),  # held through the cold start: ends at 1.9
    _ok("step", 1.0, 950.0),
    _failed("step", 1.1, "http 503", 503),  # ends at 1.11
    _ok("step", 2.3, 50.0),  # steady: started after capacity (2.25)
    _ok("step", 2.4, 60.0),
    _ok("step", 3.0, 70.0),
    _failed("step", 3.5, "reset"),
    _ok("step", 3.99, 40.0),  # started in the step, ended in the tail's second
]


def test_per_second_buckets_requests_by_completion_and_samples_by_time() -> None:
    rows = per_second(_RECORDS, _SAMPLES, _SPANS, 5.0)
    assert [r.t for r in rows] == [0, 1, 2, 3, 4]
    assert [r.phase for r in rows] == ["idle", "step", "step", "step", "tail"]
    assert [r.requests for r in rows] == [0, 3, 2, 2, 1]
    assert [r.ok for r in rows] == [0, 2, 2, 1, 1]
    assert rows[1].errors == {"http 503": 1}
    assert rows[3].errors == {"reset": 1}
    assert rows[1].failed == 1
    assert rows[1].p50_ms == pytest.approx(925.0)
    assert rows[1].p99_ms == pytest.approx(900.0 + 50.0 * 0.99)
    assert rows[0].p50_ms is None and rows[0].max_ms is None
    # ready/starting: the second's last sample; queued: its highest
    assert (rows[1].ready, rows[1].starting, rows[1].queued) == (1, 1, 8)
    assert rows[1].clients == 8
    # a failed status call is a gap, not a zero
    assert (rows[3].ready, rows[3].queued) == (2, 0)
    assert rows[4].ready == 2


def test_per_second_without_any_sample_has_no_instance_figures() -> None:
    rows = per_second([_ok("step", 0.2, 10.0)], [], [Span("step", STEP, 0.0, 1.0, 1)], 0.5)
    assert len(rows) == 1
    assert (rows[0].ok, rows[0].ready, rows[0].queued, rows[0].clients) == (1, None, None, None)


def test_summarize_counts_a_request_in_the_phase_it_started_in() -> None:
    s = summarize(_RECORDS, _SAMPLES, _SPANS, max_concurrency=4, end_s=5.0)
    assert (s.requests, s.ok, s.failed) == (8, 6, 2)
    assert s.errors == {"http 503": 1, "reset": 1}
    assert (s.max_ready, s.max_starting, s.max_queued) == (2, 1, 8)
    idle, step, tail = s.phases
    assert (idle.requests, tail.requests) == (0, 0)
    assert tail.max_ready == 2 and tail.capacity_s is None
    assert (step.requests, step.ok, step.failed) == (8, 6, 2)
    assert step.throughput == pytest.approx(6 / 3.0)
    assert step.first_ready_s == pytest.approx(0.75)
    assert step.capacity_s == pytest.approx(1.25)
    # steady: started at or after 2.25: 50, 60, 70, 40 ms and the reset
    assert step.steady_requests == 5
    assert step.steady_p50_ms == pytest.approx(55.0)
    assert step.steady_p99_ms == pytest.approx(60.0 + 10.0 * 0.97)
    assert step.steady_throughput == pytest.approx(4 / (4.03 - 2.25))
    assert step.max_ms == pytest.approx(950.0)
    assert s.phase("step") is step and s.phase("ramp") is None


def test_summarize_a_phase_that_never_reached_capacity() -> None:
    samples = [_sample(1.5, 8, 1), _sample(2.5, 8, 1)]
    s = summarize(_RECORDS, samples, _SPANS, max_concurrency=4, end_s=5.0)
    step = s.phases[1]
    assert step.capacity_s is None
    assert (step.steady_requests, step.steady_p99_ms, step.steady_throughput) == (0, None, None)


# --- gates ---------------------------------------------------------------------------------


def _summary() -> scaleout.Summary:
    return summarize(_RECORDS, _SAMPLES, _SPANS, max_concurrency=4, end_s=5.0)


def test_no_gates_no_misses() -> None:
    assert check_gates(_summary(), Gates()) == []


def test_max_errors() -> None:
    assert check_gates(_summary(), Gates(max_errors=2)) == []
    assert check_gates(_summary(), Gates(max_errors=0)) == [
        "--max-errors 0: 2 of 8 requests failed (http 503: 1, reset: 1)"
    ]


def test_max_p99_applies_to_every_loaded_phase() -> None:
    assert check_gates(_summary(), Gates(max_p99_s=1.0)) == []
    (missed,) = check_gates(_summary(), Gates(max_p99_s=0.5))
    assert missed.startswith("--max-p99 500 ms: step p99 was 9")


def test_steady_capacity_and_throughput_gates() -> None:
    assert (
        check_gates(
            _summary(),
            Gates(max_steady_p99_s=0.1, max_time_to_capacity_s=2.0, min_throughput=2.0),
        )
        == []
    )
    missed = check_gates(
        _summary(),
        Gates(max_steady_p99_s=0.05, max_time_to_capacity_s=1.0, min_throughput=100),
    )
    assert missed == [
        "--max-steady-p99 50 ms: step steady p99 was 69.7 ms",
        "--max-time-to-capacity 1s: step time to capacity was 1.25 s",
        "--min-throughput 100: step steady throughput was 2 req/s",
    ]


def test_gates_that_cannot_be_judged_count_as_missed() -> None:
    never = summarize(_RECORDS, [_sample(1.5, 8, 1)], _SPANS, max_concurrency=4, end_s=5.0)
    assert check_gates(never, Gates(max_time_to_capacity_s=10, max_steady_p99_s=1)) == [
        "--max-steady-p99 1000 ms: step steady p99 was - ms",
        "--max-time-to-capacity 10s: step time to capacity was never",
    ]
    idle_only = summarize([], [], [Span("idle", IDLE, 0, 1, 0)], 4, 1.0)
    assert check_gates(idle_only, Gates(max_p99_s=1, min_throughput=1)) == [
        "--max-p99 1000 ms: no step or ramp phase ran",
        "--min-throughput 1: no step phase ran",
    ]
    no_ok = summarize(
        [_failed("step", 1.5, "connect")], _SAMPLES, _SPANS, max_concurrency=4, end_s=5.0
    )
    assert check_gates(no_ok, Gates(max_p99_s=1)) == [
        "--max-p99 1000 ms: step had no successful response"
    ]


# --- the report ----------------------------------------------------------------------------


def test_headline_and_summary_table() -> None:
    s = _summary()
    assert headline(s, 4) == (
        "failed requests: 2 of 8 (http 503: 1, reset: 1); in the step from idle to 8 clients "
        "(2 x max_concurrency 4): 2 of 8"
    )
    text = format_summary(s, 4)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["phase", "s", "clients"]
    step = next(line for line in lines if line.startswith("step"))
    assert step.split()[:5] == ["step", "3.0", "8", "8", "2"]
    assert "instances at most: 2 ready, 1 starting; queued at most: 8" in lines


def _report(plot_name: str | None = None, missed: list[str] | None = None) -> ScaleoutReport:
    run = RunData(
        records=_RECORDS,
        samples=_SAMPLES,
        spans=_SPANS,
        end_s=5.0,
        server={"tidegate_requests_total": {"2xx": 6, "5xx": 1}},
        scale_events=[
            {"t": 1.1, "direction": "up", "from_desired": 0, "to_desired": 1, "reason": "cold"}
        ],
    )
    return ScaleoutReport(
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        machine=BENCH_MACHINE,
        settings={
            "max_concurrency": 4,
            "max_size": 6,
            "scale_down_delay": "3s",
            "queue_timeout": "60s",
            "clients": 8,
            "hold": "50ms",
            "path": "/cgi-bin/slow?ms=50",
            "phases": [
                {"name": "idle", "kind": IDLE, "duration_s": 1.0, "clients": 0},
                {"name": "step", "kind": STEP, "duration_s": 3.0, "clients": 8},
                {"name": "tail", "kind": IDLE, "duration_s": 1.0, "clients": 0},
            ],
        },
        commands={"tidegate": [str(_REPO / ".venv/bin/python"), "-m", "tidegate", "up", "x"]},
        service_file=service_file(
            "img:1", max_size=6, max_concurrency=4, scale_down_delay_s=3, queue_timeout_s=60
        ),
        run=run,
        summary=_summary(),
        seconds=per_second(_RECORDS, _SAMPLES, _SPANS, 5.0),
        gates=Gates(max_errors=0),
        missed=missed or [],
        plot=plot_name,
    )


def test_report_json() -> None:
    data = json.loads(json.dumps(_report().to_json()))
    assert data["benchmark"] == "scaleout"
    assert data["date"] == "2026-01-02T03:04:05+00:00"
    assert data["summary"]["failed"] == 2
    assert data["summary"]["errors"] == {"http 503": 1, "reset": 1}
    assert data["summary"]["headline"].startswith("failed requests: 2 of 8")
    assert [p["name"] for p in data["phases"]] == ["idle", "step", "tail"]
    assert data["phases"][1]["capacity_s"] == 1.25
    assert data["phases"][1]["failed"] == 2
    assert len(data["series"]) == 5
    second = data["series"][1]
    assert {"t", "phase", "clients", "ok", "failed", "errors", "p50_ms", "p99_ms"} <= set(second)
    assert {"ready", "starting", "desired", "queued", "inflight"} <= set(second)
    assert [f["error"] for f in data["failures"]] == ["http 503", "reset"]
    assert data["failures"][0]["detail"] == "why"
    assert data["failures_listed"] == 2
    assert data["spans"][1] == {
        "name": "step",
        "kind": "step",
        "start": 1.0,
        "end": 4.0,
        "clients": 8,
    }
    assert data["samples"][5]["error"] == "TimeoutError: "
    assert data["gates"]["max_errors"] == 0 and data["gates"]["missed"] == []
    assert data["commands"]["tidegate"].startswith(".venv/bin/python -m tidegate up")
    assert str(_REPO) not in json.dumps(data)
    assert data["plot"] is None


def test_markdown_report() -> None:
    text = format_markdown(_report("scaleout-20260102T030405Z.png", ["--max-errors 0: x"]))
    assert text.startswith("# Scale-out benchmark, 2026-01-02 03:04:05 UTC\n")
    assert "**failed requests: 2 of 8" in text
    assert "![load, instances, p99 and queue](scaleout-20260102T030405Z.png)" in text
    assert "- MISSED: --max-errors 0: x" in text
    assert "| 1 | step | 8 | 2 | 1 (http 503: 1) |" in text
    assert "## Failed requests" in text and "| step | 1.100 | 1.110 | http 503 | why |" in text
    assert "| 1.1 | up | 0 -> 1 | cold |" in text
    assert "min_size: 0" in text
    assert str(_REPO) not in text


def test_write_names_the_files_by_utc_time(tmp_path: Path) -> None:
    json_path, md_path = scaleout.write(_report(), tmp_path / "out")
    assert json_path.name == "scaleout-20260102T030405Z.json"
    assert md_path.name == "scaleout-20260102T030405Z.md"
    assert json.loads(json_path.read_text())["summary"]["requests"] == 8


def test_service_file_is_a_valid_scale_to_zero_docker_service(tmp_path: Path) -> None:
    path = tmp_path / "bench-scaleout.yaml"
    path.write_text(
        service_file(
            "tidegate-test/httpd:0123", max_size=6, max_concurrency=4,
            scale_down_delay_s=0.5, queue_timeout_s=60,
        )
    )  # fmt: skip
    (spec,) = load_service_files([path])
    assert (spec.name, spec.runtime, spec.image) == (
        scaleout.SERVICE,
        "docker",
        "tidegate-test/httpd:0123",
    )
    a = spec.autoscaling
    assert (a.min_size, a.max_size, a.max_concurrency, a.scale_down_delay) == (0, 6, 4, 0.5)
    assert spec.queue.timeout == 60.0
    assert spec.health_check.protocol == "tcp"


def test_server_counts_reads_the_service_s_figures() -> None:
    text = """\
# TYPE tidegate_requests_total counter
tidegate_requests_total{service="bench-scaleout",code_class="2xx"} 120.0
tidegate_requests_total{service="bench-scaleout",code_class="5xx"} 2.0
tidegate_requests_total{service="other",code_class="2xx"} 7.0
# TYPE tidegate_upstream_errors_total counter
tidegate_upstream_errors_total{service="bench-scaleout",kind="connect"} 1.0
# TYPE tidegate_queue_wait_seconds histogram
tidegate_queue_wait_seconds_bucket{service="bench-scaleout",le="+Inf"} 30.0
tidegate_queue_wait_seconds_count{service="bench-scaleout"} 30.0
tidegate_queue_wait_seconds_sum{service="bench-scaleout"} 12.5
"""
    assert server_counts(text) == {
        "tidegate_requests_total": {"2xx": 120, "5xx": 2},
        "tidegate_upstream_errors_total": {"connect": 1},
        "tidegate_queue_wait_seconds_count": 30,
    }


def test_flags_and_defaults() -> None:
    args = build_parser().parse_args(["scaleout"])
    assert (args.max_concurrency, args.max_size, args.clients) == (4, 6, None)
    assert scaleout._clients(args) == 20
    assert (args.hold, args.lead, args.step, args.cool_down, args.ramp, args.tail) == (
        0.05, 3.0, 20.0, 5.0, 20.0, 5.0,
    )  # fmt: skip
    assert (args.scale_down_delay, args.queue_timeout, args.sample_interval) == (3.0, 60.0, 0.25)
    assert args.no_pause is False
    assert scaleout.gates_from(args) == Gates()
    assert args.out == _REPO / "bench" / "results"
    args = build_parser().parse_args(
        [
            *("scaleout", "--max-p99", "2s", "--max-steady-p99", "150ms", "--max-errors", "0"),
            *("--clients", "12", "--step", "500ms", "--min-throughput", "100"),
        ]
    )
    assert scaleout.gates_from(args) == Gates(
        max_errors=0, max_p99_s=2.0, max_steady_p99_s=0.15, min_throughput=100.0
    )
    assert (scaleout._clients(args), args.step) == (12, 0.5)
    assert scaleout._path(0.05) == "/cgi-bin/slow?ms=50"


@pytest.mark.parametrize(
    "argv",
    [["--step", "soon"], ["--clients", "0"], ["--max-errors", "-1"], ["--max-p99", "0s"]],
)
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["scaleout", *argv])
    assert exc.value.code == 2


# --- the plot ------------------------------------------------------------------------------


def test_plot_draws_a_png_from_the_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    data = json.loads(json.dumps(_report().to_json()))
    path = plot.plot_scaleout(data, tmp_path / "run.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # and again from the saved file, through the command
    saved = tmp_path / "scaleout-x.json"
    saved.write_text(json.dumps(data))
    assert plot.main([str(saved)]) == 0
    assert (tmp_path / "scaleout-x.png").stat().st_size > 10_000


def test_plot_refuses_another_benchmark_s_json(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    other = tmp_path / "proxy.json"
    other.write_text(json.dumps({"benchmark": "proxy"}))
    assert plot.main([str(other)]) == 2


# --- the load generator against small servers ----------------------------------------------


class _Server:
    """An asyncio HTTP/1.1 server on 127.0.0.1 whose answer depends on the path."""

    def __init__(self) -> None:
        self.connections = 0
        self.inflight = 0
        self.max_inflight = 0
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                path = head.split(b" ", 2)[1].decode()
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                try:
                    if not await self.answer(path, writer):
                        return
                finally:
                    self.inflight -= 1
        finally:
            writer.close()

    async def answer(self, path: str, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False to drop the connection."""
        if path.startswith("/ok"):
            await asyncio.sleep(0.01)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        if path == "/chunked-close":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            return False
        if path == "/503":
            writer.write(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 12\r\n\r\nqueue full\r\n"
            )
            return True
        if path == "/close":
            return False
        if path == "/truncated":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
            await writer.drain()
            return False
        if path == "/reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return False
        if path == "/garbage":
            writer.write(b"SMTP READY\r\n\r\n")
            return True
        if path == "/hang":
            await asyncio.sleep(60)
        return False


@contextlib.asynccontextmanager
async def _serving() -> AsyncIterator[_Server]:
    srv = _Server()
    srv.server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    try:
        yield srv
    finally:
        srv.server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await srv.server.wait_closed()


async def _one_phase(path: str, port: int | None = None, **kw: Any) -> list[RequestRecord]:
    async with _serving() as srv:
        gen = LoadGenerator("127.0.0.1", port or srv.port, path, **kw)
        gen.start()
        try:
            await gen.run_phase(Phase("p", STEP, 0.15, 1))
        finally:
            await gen.close()
        return gen.records


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once it is closed


@pytest.mark.parametrize(
    ("path", "kind", "status"),
    [
        ("/503", "http 503", 503),
        ("/close", "closed", None),
        ("/truncated", "closed", None),
        ("/reset", "reset", None),
        ("/garbage", "protocol", None),
    ],
)
async def test_error_kinds(path: str, kind: str, status: int | None) -> None:
    records = await _one_phase(path)
    assert records, "no request was made"
    assert {(r.error, r.status) for r in records} == {(kind, status)}
    assert all(r.phase == "p" and r.end >= r.start for r in records)
    if kind == "http 503":
        assert records[0].detail == "queue full"


async def test_connect_errors() -> None:
    records = await _one_phase("/ok", port=_closed_port())
    assert records and {r.error for r in records} == {"connect"}
    assert "ConnectionRefusedError" in records[0].detail


async def test_timeouts() -> None:
    records = await _one_phase("/hang", request_timeout_s=0.05)
    assert records and {r.error for r in records} == {"timeout"}
    assert records[0].ms == pytest.approx(50, abs=40)
    assert "waiting for the response" in records[0].detail


async def test_clients_keep_their_connection_alive_and_reconnect_after_a_close() -> None:
    async with _serving() as srv:
        gen = LoadGenerator("127.0.0.1", srv.port, "/ok")
        gen.start()
        await gen.run_phase(Phase("step", STEP, 0.3, 3))
        assert len(gen.records) >= 3 * 10
        assert all(r.ok and r.status == 200 for r in gen.records)
        assert srv.connections == 3
        assert srv.max_inflight == 3
        assert gen.active == 0 and gen.in_flight == 0
        closing = LoadGenerator("127.0.0.1", srv.port, "/chunked-close")
        closing.start()
        await closing.run_phase(Phase("c", STEP, 0.1, 1))
        assert all(r.ok for r in closing.records)
        assert srv.connections == 3 + len(closing.records)


async def test_a_ramp_adds_clients_and_phases_are_recorded_as_they_ran() -> None:
    async with _serving() as srv:
        gen = LoadGenerator("127.0.0.1", srv.port, "/ok")
        gen.start()
        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(gen.active)
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        try:
            await gen.run_phase(Phase("idle", IDLE, 0.1))
            await gen.run_phase(Phase("ramp", RAMP, 0.6, 3))
        finally:
            watcher.cancel()
        # clients only ever added while the ramp runs (all stop at its end)
        rising = seen[: len(seen) - seen[::-1].index(3)]
        assert rising == sorted(rising) and 1 in rising and 2 in rising
        assert srv.max_inflight <= 3
        assert [(s.name, s.kind, s.clients) for s in gen.spans] == [
            ("idle", IDLE, 0),
            ("ramp", RAMP, 3),
        ]
        assert gen.spans[0].end <= gen.spans[1].start
        assert gen.spans[1].end - gen.spans[1].start >= 0.6
        assert {r.phase for r in gen.records} == {"ramp"}


async def test_an_idle_phase_waits_for_its_condition_within_its_limit() -> None:
    gen = LoadGenerator("127.0.0.1", 9, "/")
    gen.start()
    flag = {"done": False}
    asyncio.get_running_loop().call_later(0.2, flag.update, {"done": True})
    span = await gen.run_phase(Phase("cool", IDLE, 0.05), lambda: flag["done"], 5.0)
    assert 0.15 <= span.end - span.start < 1.0
    span = await gen.run_phase(Phase("cool2", IDLE, 0.05), lambda: False, 0.1)
    assert 0.1 <= span.end - span.start < 0.5


# --- bench all -----------------------------------------------------------------------------


def test_overall_status_is_the_worst() -> None:
    assert bench_all.overall_status([0, 0, 0]) == 0
    assert bench_all.overall_status([0, 1, 0]) == 1
    assert bench_all.overall_status([1, 2, 0]) == 2
    assert bench_all.overall_status([0, 130]) == 2
    assert bench_all.overall_status([0, None]) == 0
    assert bench_all.overall_status([]) == 0


def test_all_defaults_fit_and_parse(tmp_path: Path) -> None:
    args = build_parser().parse_args(["all"])
    assert args.proxy_args == "--duration 5 --warmup 1"
    assert args.scaleout_args == "--max-errors 0"
    proxy = bench_all.parse_benchmark_args("proxy", args.proxy_args, tmp_path)
    assert (proxy.duration, proxy.warmup, proxy.out) == (5, 1, tmp_path)
    cold = bench_all.parse_benchmark_args("coldstart", args.coldstart_args, tmp_path)
    assert cold.rounds == 10
    scale = bench_all.parse_benchmark_args("scaleout", "--step 5s --out x", tmp_path)
    assert (scale.step, scale.out) == (5.0, Path("x"))


def test_headlines_from_each_benchmark_s_json() -> None:
    proxy = {
        "results": [
            {"target": "nginx", "body": "small", "connections": 50, "rps": 1.0},
            {
                "target": "tidegate",
                "body": "small",
                "connections": 50,
                "rps": 9000.0,
                "rps_vs_nginx": 0.61,
                "p99_vs_nginx": 1.5,
            },
        ],
        "gates": {"missed": ["x"]},
    }
    assert bench_all.headline("proxy", proxy) == (
        "tidegate small/50: 0.61x nginx's req/s, p99 1.50x nginx's; 1 gate(s) missed"
    )
    cold = {"results": {"target_line": "overhead median 9.0 ms <= 25 ms: ok"}}
    assert bench_all.headline("coldstart", cold) == "overhead median 9.0 ms <= 25 ms: ok"
    assert bench_all.headline("scaleout", {"summary": {"headline": "failed requests: 0 of 9"}})


def _fake_benchmark(name: str, status: int | Exception) -> ModuleType:
    module = ModuleType(name)

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--out", type=Path)

    def main(args: argparse.Namespace) -> int:
        if isinstance(status, Exception):
            raise status
        args.out.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": name, "gates": {"missed": ["g"] if status == 1 else []}}
        (args.out / f"{name}-20260101T000000Z.json").write_text(json.dumps(doc))
        return status

    module.add_arguments = add_arguments  # type: ignore[attr-defined]
    module.main = main  # type: ignore[attr-defined]
    return module


def test_all_runs_every_benchmark_and_exits_with_the_worst(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from bench.procs import StartError

    fakes = {
        "proxy": _fake_benchmark("proxy", 0),
        "coldstart": _fake_benchmark("coldstart", StartError("no engine")),
        "scaleout": _fake_benchmark("scaleout", 1),
    }
    monkeypatch.setattr(bench_all, "BENCHMARKS", fakes)
    monkeypatch.setattr(bench_all, "leftovers", lambda: [])
    args = SimpleNamespace(
        only="proxy,coldstart,scaleout",
        out=tmp_path,
        proxy_args="",
        coldstart_args="",
        scaleout_args="",
    )
    assert bench_all.main(args) == 2  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert "proxy      exit 0" in out
    assert "coldstart  exit 2" in out and "no engine" in out
    assert "scaleout   exit 1" in out and "1 gate(s) missed" in out
    assert "left running: nothing" in out
    (summary,) = tmp_path.glob("all-*.json")
    doc = json.loads(summary.read_text())
    assert [(b["name"], b["status"]) for b in doc["benchmarks"]] == [
        ("proxy", 0),
        ("coldstart", 2),
        ("scaleout", 1),
    ]
    assert doc["benchmarks"][0]["files"] == ["proxy-20260101T000000Z.json"]
    args.only = "proxy"
    assert bench_all.main(args) == 0  # type: ignore[arg-type]
    monkeypatch.setattr(bench_all, "leftovers", lambda: ["container x"])
    assert bench_all.main(args) == 2  # type: ignore[arg-type]
    args.only = "proxy,nope"
    assert bench_all.main(args) == 2  # type: ignore[arg-type]


def test_leftovers_sees_our_child_processes() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert f"process {child.pid}" in bench_all.leftovers()
    finally:
        child.kill()
        child.wait()
    assert f"process {child.pid}" not in bench_all.leftovers()


# --- locust --------------------------------------------------------------------------------


# locust patches the standard library with gevent when imported (ssl, socket, threading),
# which must not happen inside the test process: the locustfile runs in a child Python.
_NEEDS_LOCUST = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None,
    reason="locust is not installed (the bench extra: pip install -e '.[bench]')",
)

_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
try:
    import locustfile as lf
except ValueError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
out = {"step_abstract": lf.StepShape.abstract, "ramp_abstract": lf.RampShape.abstract}
times = json.loads(sys.argv[2])
for name in ("StepShape", "RampShape"):
    try:
        shape = getattr(lf, name)()
        out[name] = [shape.users_at(t) for t in times]
    except ValueError as exc:
        out[name] = str(exc)
out["durations"] = [lf.parse_duration(t) for t in ("250ms", "2m", "3")]
print(json.dumps(out))
"""


def _shapes(times: list[float], **env: str) -> dict[str, Any]:
    """The locustfile's shapes evaluated at `times` in a child Python with `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(_REPO / "bench"), json.dumps(times)],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _ticks(values: list[Any]) -> list[tuple[int, float] | None]:
    return [None if v is None else (v[0], v[1]) for v in values]


@_NEEDS_LOCUST
def test_locust_step_shape() -> None:
    got = _shapes([0, 9.9, 10, 25, 29.9, 30], TIDEGATE_STEPS="5,10,20", TIDEGATE_STEP_TIME="10s")
    assert _ticks(got["StepShape"]) == [(5, 5.0), (5, 5.0), (10, 5.0), (20, 10.0), (20, 10.0), None]
    assert (got["step_abstract"], got["ramp_abstract"]) == (False, True)
    assert got["durations"] == [0.25, 120.0, 3.0]
    idle = _shapes([0, 2.9, 3, 22.9, 23], TIDEGATE_IDLE="3s")
    assert _ticks(idle["StepShape"]) == [(0, 1.0), (0, 1.0), (20, 20.0), (20, 20.0), None]


@_NEEDS_LOCUST
def test_locust_ramp_shape() -> None:
    got = _shapes(
        [0, 0.4, 1, 2.5, 4.9, 5, 6.9, 7],
        TIDEGATE_SHAPE="ramp",
        TIDEGATE_USERS="10",
        TIDEGATE_RAMP="5s",
        TIDEGATE_HOLD="2s",
    )
    assert _ticks(got["RampShape"]) == [
        (0, 2.0),
        (1, 2.0),
        (2, 2.0),
        (5, 2.0),
        (10, 2.0),
        (10, 2.0),
        (10, 2.0),
        None,
    ]
    assert (got["step_abstract"], got["ramp_abstract"]) == (True, False)
    none = _shapes([0], TIDEGATE_SHAPE="none")
    assert none["step_abstract"] and none["ramp_abstract"]


@_NEEDS_LOCUST
def test_locust_settings_are_checked() -> None:
    assert "TIDEGATE_STEPS" in _shapes([0], TIDEGATE_STEPS="5,x")["StepShape"]
    assert "TIDEGATE_RAMP" in _shapes([0], TIDEGATE_RAMP="0s")["RampShape"]
    assert "TIDEGATE_SHAPE" in _shapes([0], TIDEGATE_SHAPE="spiral")["error"]


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b"hello\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
@_NEEDS_LOCUST
def test_locust_runs_headless_with_the_step_shape(tmp_path: Path) -> None:
    locust = Path(sys.executable).with_name("locust")
    if not locust.is_file():
        pytest.skip("the locust command is not installed beside this Python")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDEGATE_")}
    env.update(TIDEGATE_STEPS="2,4", TIDEGATE_STEP_TIME="2s", TIDEGATE_PATH="/hello")
    with _http_server() as port:
        done = subprocess.run(
            [
                *(str(locust), "-f", str(_REPO / "bench" / "locustfile.py"), "--headless"),
                *("--host", f"http://127.0.0.1:{port}", "--csv", str(tmp_path / "run")),
                *("--only-summary", "--loglevel", "WARNING"),
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    stats = (tmp_path / "run_stats.csv").read_text().splitlines()
    header = stats[0].split(",")
    row = dict(zip(header, stats[1].split(","), strict=True))
    assert row["Name"] == "/hello"
    assert int(row["Request Count"]) > 10
    assert int(row["Failure Count"]) == 0


# --- wrk's report script -------------------------------------------------------------------


@pytest.mark.slow
def test_wrk_report_script_prints_json_percentiles() -> None:
    wrk = shutil.which("wrk")
    if wrk is None:
        pytest.skip("wrk is not installed")
    with _http_server() as port:
        done = subprocess.run(
            [
                *(wrk, "-t1", "-c2", "-d1s", "-s", str(_REPO / "bench" / "wrk-report.lua")),
                f"http://127.0.0.1:{port}/",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout.strip().splitlines()[-1])
    assert data["requests"] > 0
    assert 0 < data["p50_ms"] <= data["p90_ms"] <= data["p99_ms"] <= data["max_ms"]
    assert data["errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0, "status": 0}


# --- one real run --------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_a_short_run_for_real(tmp_path: Path) -> None:
    """The whole benchmark with phases of a few seconds: exit 0 under --max-errors 0, a JSON
    with every field, instances that came and went, and no container of its scope left."""
    from tests.images import _docker_client, build_images

    client = _docker_client()
    try:
        build_images(client)
        argv = ["scaleout", "--lead", "1s", "--step", "4s", "--cool-down", "1s"]
        argv += ["--ramp", "3s", "--tail", "1s", "--scale-down-delay", "1s"]
        argv += ["--max-errors", "0", "--out", str(tmp_path)]
        done = subprocess.run(
            [sys.executable, "-m", "bench", *argv],
            cwd=_REPO,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-4000:]
        left = client.containers.list(
            all=True, filters={"label": [f"tidegate.scope={scaleout.SCOPE}"]}
        )
        assert left == []
    finally:
        client.close()
    assert "failed requests: 0 of" in done.stdout
    (path,) = tmp_path.glob("scaleout-*.json")
    data = json.loads(path.read_text())
    summary = data["summary"]
    assert summary["failed"] == 0 and summary["requests"] > 50
    assert summary["max_ready"] >= 2
    assert [p["name"] for p in data["phases"]] == ["idle", "step", "cool-down", "ramp", "tail"]
    step = data["phases"][1]
    assert step["clients"] == 20 and step["ok"] == step["requests"] > 0
    assert step["first_ready_s"] is not None
    # the cool-down lasted until no instance was left
    ramp_start = data["spans"][3]["start"]
    before = [s for s in data["samples"] if s["t"] < ramp_start and s["error"] is None]
    assert before[-1]["ready"] + before[-1]["starting"] + before[-1]["draining"] == 0
    assert data["series"] and all("ready" in row for row in data["series"])
    assert data["server"]["tidegate_requests_total"]["2xx"] == summary["ok"]
    assert data["gates"] == {
        "max_errors": 0,
        "max_p99_s": None,
        "max_steady_p99_s": None,
        "max_time_to_capacity_s": None,
        "min_throughput": None,
        "missed": [],
    }
    assert (tmp_path / path.name.replace(".json", ".md")).is_file()
    if plot.available():
        assert data["plot"] == path.name.replace(".json", ".png")
        assert (tmp_path / data["plot"]).is_file()
