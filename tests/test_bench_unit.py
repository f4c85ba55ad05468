"""The proxy benchmark's pure parts: wrk report parsing, medians and ratios, SLO gates.

The wrk reports below were captured from real wrk 4.1.0 runs (Debian build) against nginx,
HAProxy and small Python servers written to provoke each error kind.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from bench import configs, report
from bench.procs import CpuPlan, Workspace, cpu_seconds, plan_cpus, stat_cpu_ticks
from bench.proxy import (
    GATE_CELL,
    Cell,
    Measurement,
    Row,
    check_gates,
    log_cost,
    summarize,
)
from bench.wrk import WrkError, WrkResult, parse_wrk_output, wrk_command

# --- wrk reports captured from real runs ---------------------------------------------------

_OK_MS = """\
Running 2s test @ http://127.0.0.1:55757/64k
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.88ms    1.61ms  11.55ms   72.90%
    Req/Sec     9.92k     1.90k   13.19k    65.00%
  Latency Distribution
     50%    4.51ms
     75%    5.97ms
     90%    7.19ms
     99%    9.52ms
  19796 requests in 2.01s, 1.21GB read
Requests/sec:   9856.39
Transfer/sec:    618.45MB
"""

_OK_US = """\
Running 2s test @ http://127.0.0.1:42197/small
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    89.29us  181.32us   4.24ms   98.54%
    Req/Sec    13.41k     1.54k   16.80k    71.43%
  Latency Distribution
     50%   69.00us
     75%   80.00us
     90%   94.00us
     99%  539.00us
  27985 requests in 2.10s, 6.65MB read
Requests/sec:  13325.47
Transfer/sec:      3.16MB
"""

# wrk switches from us to ms already at 900 us, so one report can mix both units.
_MIXED_UNITS = """\
Running 1s test @ http://127.0.0.1:33889/small
  1 threads and 30 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   726.38us  227.58us   4.33ms   88.05%
    Req/Sec    39.13k     2.04k   41.83k    70.00%
  Latency Distribution
     50%  709.00us
     75%  820.00us
     90%    0.90ms
     99%    1.25ms
  38855 requests in 1.00s, 9.23MB read
Requests/sec:  38803.74
Transfer/sec:      9.21MB
"""

# Latencies in seconds, which wrk pads with a trailing space (kept verbatim here).
_SECONDS = (
    "Running 4s test @ http://127.0.0.1:38601/slow\n"
    "  1 threads and 1 connections\n"
    "  Thread Stats   Avg      Stdev     Max   +/- Stdev\n"
    "    Latency     1.23s    24.90ms   1.24s    66.67%\n"
    "    Req/Sec     0.00      0.00     0.00    100.00%\n"
    "  Latency Distribution\n"
    "     50%    1.24s \n"
    "     75%    1.24s \n"
    "     90%    1.24s \n"
    "     99%    1.24s \n"
    "  3 requests in 4.01s, 339.00B read\n"
    "Requests/sec:      0.75\n"
    "Transfer/sec:      84.55B\n"
)

_NON_2XX = """\
Running 2s test @ http://127.0.0.1:42197/missing
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   129.55us  148.12us   4.40ms   99.03%
    Req/Sec    80.37k     2.79k   84.81k    65.00%
  Latency Distribution
     50%  114.00us
     75%  129.00us
     90%  148.00us
     99%  275.00us
  159458 requests in 2.00s, 46.84MB read
  Non-2xx or 3xx responses: 159458
Requests/sec:  79651.06
Transfer/sec:     23.40MB
"""

_TIMEOUTS = """\
Running 3s test @ http://127.0.0.1:38601/vslow
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     1.00      0.00     1.00    100.00%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  4 requests in 3.01s, 452.00B read
  Socket errors: connect 0, read 0, write 0, timeout 4
Requests/sec:      1.33
Transfer/sec:     150.39B
"""

_READ_ERRORS = """\
Running 1s test @ http://127.0.0.1:38601/close
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.00s, 116.15KB read
  Socket errors: connect 0, read 2899, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:    116.13KB
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            _OK_MS,
            WrkResult(9856.39, 4.51, 9.52, requests=19796, duration_s=2.01),
            id="ms",
        ),
        pytest.param(
            _OK_US,
            WrkResult(13325.47, 0.069, 0.539, requests=27985, duration_s=2.10),
            id="us",
        ),
        pytest.param(
            _MIXED_UNITS,
            WrkResult(38803.74, 0.709, 1.25, requests=38855, duration_s=1.00),
            id="us-and-ms",
        ),
        pytest.param(
            _SECONDS,
            WrkResult(0.75, 1240.0, 1240.0, requests=3, duration_s=4.01),
            id="s-with-trailing-space",
        ),
        pytest.param(
            _NON_2XX,
            WrkResult(79651.06, 0.114, 0.275, requests=159458, duration_s=2.0, non_2xx=159458),
            id="non-2xx",
        ),
        pytest.param(
            _TIMEOUTS,
            WrkResult(1.33, 0.0, 0.0, requests=4, duration_s=3.01, timeout_errors=4),
            id="timeouts",
        ),
        pytest.param(
            _READ_ERRORS,
            WrkResult(0.0, 0.0, 0.0, requests=0, duration_s=1.0, read_errors=2899),
            id="read-errors",
        ),
    ],
)
def test_parse_wrk_output(text: str, expected: WrkResult) -> None:
    """Each captured report yields its req/s, p50/p99 in ms, request count and error counts."""
    got = parse_wrk_output(text)
    assert got.requests_per_sec == pytest.approx(expected.requests_per_sec)
    assert got.p50_ms == pytest.approx(expected.p50_ms)
    assert got.p99_ms == pytest.approx(expected.p99_ms)
    assert got.duration_s == pytest.approx(expected.duration_s)
    assert (got.requests, got.connect_errors, got.read_errors) == (
        expected.requests,
        expected.connect_errors,
        expected.read_errors,
    )
    assert (got.write_errors, got.timeout_errors, got.non_2xx) == (
        expected.write_errors,
        expected.timeout_errors,
        expected.non_2xx,
    )


@pytest.mark.parametrize(
    ("text", "flagged"),
    [
        pytest.param(_OK_MS, False, id="clean"),
        pytest.param(_SECONDS, False, id="slow-but-clean"),
        pytest.param(_NON_2XX, True, id="non-2xx"),
        pytest.param(_TIMEOUTS, True, id="timeouts"),
        pytest.param(_READ_ERRORS, True, id="read-errors"),
    ],
)
def test_runs_with_errors_are_flagged(text: str, flagged: bool) -> None:
    """A run is flagged exactly when wrk reports socket errors or error statuses."""
    assert parse_wrk_output(text).flagged is flagged


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(_OK_MS.split("  Latency Distribution")[0], id="no-latency-flag"),
        pytest.param(_OK_MS.replace("Requests/sec:   9856.39\n", ""), id="no-requests-sec"),
    ],
)
def test_parse_rejects_incomplete_reports(text: str) -> None:
    """A report missing req/s, the request count or the percentiles is an error, not zeros."""
    with pytest.raises(WrkError):
        parse_wrk_output(text)


def test_wrk_command() -> None:
    """The wrk argv carries pinning, one thread, connections, duration and --latency."""
    argv = wrk_command(
        "http://127.0.0.1:1/small", connections=50, duration_s=10, cpu_prefix=["taskset", "-c", "0"]
    )
    assert argv == [
        "taskset", "-c", "0", "wrk", "-t", "1", "-c", "50", "-d", "10s",
        "--timeout", "5s", "--latency", "http://127.0.0.1:1/small",
    ]  # fmt: skip


# --- medians, ratios and gates ---------------------------------------------------------------


def _m(
    target: str,
    rps: float,
    p99: float,
    rnd: int = 1,
    cell: Cell = GATE_CELL,
    read_errors: int = 0,
    cpu_s: float | None = None,
) -> Measurement:
    result = WrkResult(rps, p99 / 2, p99, int(rps), 1.0, read_errors=read_errors)
    return Measurement(target, cell, rnd, result, ("wrk",), cpu_s)


def test_summarize_takes_medians_and_ratios_per_cell() -> None:
    """Figures are medians over rounds, and ratios compare targets within the same cell."""
    other = Cell("64k", 1)
    rows = summarize(
        [
            _m("direct", 100.0, 1.0, 1),
            _m("direct", 300.0, 3.0, 2),
            _m("direct", 200.0, 2.0, 3),
            _m("nginx", 50.0, 4.0, 1),
            _m("nginx", 40.0, 6.0, 2),
            _m("nginx", 60.0, 5.0, 3),
            _m("tidegate", 25.0, 10.0, 1),
            _m("nginx", 10.0, 1.0, 1, cell=other),
        ]
    )
    by_key = {(r.target, r.body, r.connections): r for r in rows}
    tide = by_key[("tidegate", "small", 50)]
    assert by_key[("direct", "small", 50)].rps == 200.0
    assert by_key[("nginx", "small", 50)].p99_ms == 5.0
    assert tide.rps_vs_direct == pytest.approx(25 / 200)
    assert tide.rps_vs_nginx == pytest.approx(25 / 50)
    assert tide.p99_vs_nginx == pytest.approx(10 / 5)
    assert by_key[("nginx", "64k", 1)].rps_vs_direct is None
    assert [r.target for r in rows[:3]] == ["direct", "tidegate", "nginx"]


def _rows(tide_rps: float, tide_p99: float, read_errors: int = 0) -> list[Row]:
    tide = _m("tidegate", tide_rps, tide_p99, read_errors=read_errors)
    return summarize([_m("nginx", 1000.0, 2.0), tide])


@pytest.mark.parametrize(
    ("rows", "min_ratio", "max_p99", "missed"),
    [
        pytest.param(_rows(900.0, 3.0), None, None, [], id="no-gates-set"),
        pytest.param(_rows(900.0, 3.0), 0.8, 2.0, [], id="both-pass"),
        pytest.param(_rows(800.0, 4.0), 0.8, 2.0, [], id="exactly-at-limits"),
        pytest.param(_rows(700.0, 3.0), 0.8, 2.0, ["--min-ratio-nginx"], id="too-slow"),
        pytest.param(_rows(900.0, 5.0), 0.8, 2.0, ["--max-p99-ratio"], id="tail-too-long"),
        pytest.param(
            _rows(500.0, 9.0), 0.8, 2.0, ["--min-ratio-nginx", "--max-p99-ratio"], id="both-miss"
        ),
        pytest.param(_rows(500.0, 9.0), None, 2.0, ["--max-p99-ratio"], id="only-p99-set"),
        pytest.param(
            _rows(900.0, 3.0, read_errors=1), 0.8, None, ["--min-ratio-nginx"], id="errors-fail"
        ),
        pytest.param(
            summarize([_m("tidegate", 900.0, 3.0)]),
            0.8,
            2.0,
            ["--min-ratio-nginx", "--max-p99-ratio"],
            id="nginx-not-measured",
        ),
    ],
)
def test_check_gates(
    rows: list[Row], min_ratio: float | None, max_p99: float | None, missed: list[str]
) -> None:
    """Each missed gate (or one that cannot be evaluated) gives one message naming it."""
    messages = check_gates(rows, min_ratio, max_p99)
    assert [m.split()[0] for m in messages] == missed


# --- CPU plan, configuration, process cleanup ------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "pin", "plan"),
    [
        pytest.param({0, 1}, True, (0, 1), id="two-cpus"),
        pytest.param({3, 1, 7}, True, (1, 3), id="first-two-allowed"),
        pytest.param({0}, True, (None, None), id="one-cpu"),
        pytest.param({0, 1}, False, (None, None), id="no-pin"),
    ],
)
def test_plan_cpus(allowed: set[int], pin: bool, plan: tuple[int | None, int | None]) -> None:
    """Load goes on the first allowed CPU and proxies on the second; one CPU means no pinning."""
    got = plan_cpus(allowed, pin=pin)
    assert (got.load_cpu, got.proxy_cpu) == plan
    assert got.load_prefix() == ([] if plan[0] is None else ["taskset", "-c", str(plan[0])])


def test_unpinned_plan_says_why() -> None:
    """An unpinned plan's description gives the reason, for the report."""
    assert "one CPU" in CpuPlan(None, None, "only one CPU is available").describe()


def test_small_body_fits_an_nginx_string() -> None:
    """The small body is 100 bytes that need no escaping inside nginx's `return` string."""
    assert len(configs.SMALL_BODY.encode()) == 100
    assert not set(configs.SMALL_BODY) & set("\"'\\;$")


def test_workspace_stops_the_whole_group_and_removes_its_dir() -> None:
    """Leaving a Workspace kills each spawned process and its children, then deletes the dir."""
    with Workspace() as ws:
        proc = ws.spawn("sleeper", ["sh", "-c", "sleep 30 & echo $! > child.pid; wait"])
        deadline = time.monotonic() + 5
        while not ws.path("child.pid").exists() or not ws.path("child.pid").read_text():
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.01)
        child = int(ws.path("child.pid").read_text())
        workdir = ws.dir
    assert proc.popen.returncode == -signal.SIGTERM
    assert not workdir.exists()
    assert _gone(child)


def _gone(pid: int) -> bool:
    # The orphaned child is reaped by init, maybe not at once: a zombie counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# --- CPU per request and the access log's cost ----------------------------------------------


def test_log_cost_pairs_each_rounds_runs() -> None:
    """The change is the median of per-round pairs, not the ratio of two medians: a round
    where the whole machine slowed down moves both runs of its pair. CPU per request is the
    target's CPU over its requests."""
    runs = [
        # round 1 fast, round 2 slow (for both), round 3 in between; the log costs 4%, 2%, 10%
        _m("tidegate", 1000, 2.0, 1, cpu_s=1.0),
        _m("tidegate+log", 960, 2.0, 1, cpu_s=1.0),
        _m("tidegate", 500, 2.0, 2, cpu_s=1.0),
        _m("tidegate+log", 490, 2.0, 2, cpu_s=1.02),
        _m("tidegate", 800, 2.0, 3, cpu_s=1.0),
        _m("tidegate+log", 720, 2.0, 3, cpu_s=0.9),
        _m("nginx", 3000, 2.0, 1, cpu_s=1.0),
        _m("tidegate", 100, 2.0, 1, cell=Cell("64k", 1)),  # no pair: no cost for it
    ]
    (cost,) = log_cost(runs)
    assert cost.cell == GATE_CELL and cost.rounds == 3
    assert cost.rps_change == pytest.approx(-0.04)  # the median of -4%, -2%, -10%
    # CPU us/request (1 s runs): 1000, 2000, 1250 without; 1041.7, 2081.6, 1250 with
    assert cost.cpu_us == pytest.approx(1250.0)
    assert cost.cpu_us_log == pytest.approx(1250.0)
    assert cost.cpu_change == pytest.approx(0.0)
    rows = {r.target: r for r in summarize(runs) if r.connections == 50}
    assert rows["nginx"].cpu_us == pytest.approx(1.0 / 3000 * 1e6)
    text = "\n".join(report.log_cost_lines([cost]))
    assert "small/50: req/s -4.0%, CPU 1250.0 -> 1250.0 us/req (+0.0%) over 3 round(s)" in text


def test_cpu_per_request_is_unknown_when_a_round_was_not_measured() -> None:
    rows = summarize([_m("tidegate", 1000, 2.0, 1, cpu_s=1.0), _m("tidegate", 1000, 2.0, 2)])
    assert rows[0].cpu_us is None


def test_stat_cpu_ticks_reads_past_a_name_with_spaces_and_parentheses() -> None:
    stat = "42 (a) b (c)) S 1 42 42 0 -1 4194304 100 0 0 0 17 5 0 0 20 0 1 0 100 0 0"
    assert stat_cpu_ticks(stat) == 22  # utime 17 + stime 5


def test_cpu_seconds_counts_a_process_and_its_children() -> None:
    """A proxy's workers are its children: a busy child's CPU shows in its parent's total."""
    with Workspace() as ws:
        busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; echo done > busy.done; sleep 30"
        proc = ws.spawn("parent", ["sh", "-c", f"sh -c '{busy}' & wait"])
        deadline = time.monotonic() + 60
        while not ws.path("busy.done").exists():
            assert time.monotonic() < deadline, "the busy child never finished its loop"
            time.sleep(0.01)
        total = cpu_seconds(proc.popen.pid)
        with open(f"/proc/{proc.popen.pid}/stat") as f:
            own = stat_cpu_ticks(f.read()) / os.sysconf("SC_CLK_TCK")
        assert total >= 0.05 and total > own
