"""The cold-start benchmark's pure parts (no Docker, no clock), and one real run with Docker.

The unit tests feed made-up milliseconds to the statistics, the summary and the report; the
service file is checked by the scaler's own loader. The last test runs the whole benchmark
for one round against the local engine and is skipped when none answers.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bench import coldstart
from bench.__main__ import build_parser
from bench.coldstart import (
    BARE,
    TIDEGATE,
    ColdstartReport,
    Sample,
    Stats,
    Step,
    Summary,
    check_gate,
    describe,
    format_markdown,
    format_summary,
    host_port,
    percentile,
    plan_steps,
    service_file,
    summarize,
    target_line,
)
from scaler.spec import load_service_files
from tests.conftest import BENCH_MACHINE
from tests.images import _docker_client, build_images

_REPO = Path(__file__).resolve().parent.parent


def _samples(bare: list[float], tide: list[float], warmup: tuple[float, float] | None = None):
    out = []
    if warmup is not None:
        out += [Sample(Step(BARE, 1, True), warmup[0]), Sample(Step(TIDEGATE, 1, True), warmup[1])]
    for r, (b, t) in enumerate(zip(bare, tide, strict=True), 1):
        out += [Sample(Step(BARE, r), b), Sample(Step(TIDEGATE, r), t)]
    return out


# --- the plan ------------------------------------------------------------------------------


def test_plan_interleaves_kinds_round_by_round_after_the_warmups() -> None:
    assert plan_steps(3, 1) == [
        Step(BARE, 1, True),
        Step(TIDEGATE, 1, True),
        Step(BARE, 1),
        Step(TIDEGATE, 1),
        Step(BARE, 2),
        Step(TIDEGATE, 2),
        Step(BARE, 3),
        Step(TIDEGATE, 3),
    ]


def test_plan_without_warmup() -> None:
    assert plan_steps(1, 0) == [Step(BARE, 1), Step(TIDEGATE, 1)]
    assert len(plan_steps(10, 2)) == 24


@pytest.mark.parametrize(("rounds", "warmup"), [(0, 1), (-1, 0), (1, -1)])
def test_plan_rejects_impossible_counts(rounds: int, warmup: int) -> None:
    with pytest.raises(ValueError):
        plan_steps(rounds, warmup)


def test_step_names_itself() -> None:
    assert str(Step(BARE, 2)) == "round 2 bare"
    assert str(Step(TIDEGATE, 1, True)) == "warm-up 1 tidegate"


# --- statistics ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [[1.0, 2.0], [5.0, 1.0, 3.0], [10.0, 20.0, 30.0, 40.0], [float(x) for x in range(1, 12)]],
)
def test_percentile_agrees_with_statistics_inclusive_quantiles(values: list[float]) -> None:
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    assert percentile(values, 90) == pytest.approx(deciles[8])
    assert percentile(values, 50) == pytest.approx(statistics.median(values))


def test_percentile_edges() -> None:
    assert percentile([7.0], 90) == 7.0
    assert percentile([3.0, 1.0, 2.0], 0) == 1.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([0.0, 10.0], 90) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_describe() -> None:
    assert describe([30.0, 10.0, 20.0]) == Stats(n=3, median=20.0, p90=28.0, min=10.0, max=30.0)
    with pytest.raises(ValueError):
        describe([])


def test_summarize_leaves_warmups_out_and_takes_the_difference_of_medians() -> None:
    samples = _samples(
        bare=[240.0, 250.0, 260.0], tide=[250.0, 300.0, 262.0], warmup=(900.0, 1900.0)
    )
    s = summarize(samples)
    assert s.bare == describe([240.0, 250.0, 260.0])
    assert s.tidegate == describe([250.0, 300.0, 262.0])
    assert s.overhead_ms == pytest.approx(262.0 - 250.0)
    # per round: 10, 50, 2 -> 10
    assert s.paired_overhead_ms == pytest.approx(10.0)
    assert s.target_met


def test_summarize_needs_both_kinds_measured() -> None:
    only_warmups = _samples([], [], warmup=(1.0, 2.0))
    with pytest.raises(ValueError, match="bare, tidegate"):
        summarize(only_warmups)
    with pytest.raises(ValueError, match="tidegate"):
        summarize([Sample(Step(BARE, 1), 1.0)])


def _summary(overhead: float) -> Summary:
    bare = Stats(1, 200.0, 200.0, 200.0, 200.0)
    tide = Stats(1, 200.0 + overhead, 200.0 + overhead, 200.0 + overhead, 200.0 + overhead)
    return Summary(bare=bare, tidegate=tide, overhead_ms=overhead, paired_overhead_ms=overhead)


@pytest.mark.parametrize(
    ("overhead", "line"),
    [
        (12.34, "overhead median 12.3 ms <= 25 ms: ok"),
        (25.0, "overhead median 25.0 ms <= 25 ms: ok"),
        (25.04, "overhead median 25.0 ms <= 25 ms: missed"),
        (-3.0, "overhead median -3.0 ms <= 25 ms: ok"),
        (80.0, "overhead median 80.0 ms <= 25 ms: missed"),
    ],
)
def test_target_line(overhead: float, line: str) -> None:
    assert target_line(_summary(overhead)) == line


@pytest.mark.parametrize(
    ("overhead", "limit", "missed"),
    [(30.0, None, False), (10.0, 25.0, False), (25.0, 25.0, False), (30.0, 25.0, True)],
)
def test_check_gate(overhead: float, limit: float | None, missed: bool) -> None:
    messages = check_gate(_summary(overhead), limit)
    assert bool(messages) == missed
    if missed:
        assert messages == ["--max-overhead-ms 25: the overhead median was 30.0 ms"]


# --- formatting ----------------------------------------------------------------------------


def test_format_summary_shows_both_kinds_the_target_and_every_round() -> None:
    samples = _samples(bare=[240.0, 250.0], tide=[251.5, 259.0], warmup=(300.0, 320.0))
    text = format_summary(summarize(samples), samples)
    lines = text.splitlines()
    assert any(line.startswith("bare container") and "245.0" in line for line in lines)
    assert any(line.startswith("through tidegate") and "255.2" in line for line in lines)
    assert "overhead median 10.2 ms <= 25 ms: ok" in lines
    header = lines.index("per round (ms): bare / tidegate / tidegate - bare")
    rounds = [line.split() for line in lines[header + 1 :]]
    assert rounds == [
        ["warm-up", "1:", "300.0", "/", "320.0", "/", "20.0"],
        ["1:", "240.0", "/", "251.5", "/", "11.5"],
        ["2:", "250.0", "/", "259.0", "/", "9.0"],
    ]


def _report(samples: list[Sample], missed: list[str] | None = None) -> ColdstartReport:
    return ColdstartReport(
        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
        machine=BENCH_MACHINE,
        settings={"rounds": 2, "warmup": 1, "settle_s": 0.5},
        commands={
            "tidegate": [
                str(_REPO / ".venv/bin/python"),
                "-m",
                "tidegate",
                "up",
                "<tmp>/bench-coldstart.yaml",
            ]
        },
        service_file=service_file("img:1"),
        summary=summarize(samples),
        samples=samples,
        gates={"max_overhead_ms": 5.0 if missed else None},
        missed=missed or [],
    )


def test_report_json_has_the_figures_every_run_and_relative_commands() -> None:
    samples = _samples(bare=[240.0, 250.1234567], tide=[251.5, 259.0], warmup=(300.0, 320.0))
    data = json.loads(json.dumps(_report(samples).to_json()))
    assert data["benchmark"] == "coldstart"
    assert data["date"] == "2026-01-02T03:04:05+00:00"
    results = data["results"]
    assert results["unit"] == "ms"
    assert results["bare"] == {
        "n": 2,
        "median": 245.062,
        "p90": 249.111,
        "min": 240.0,
        "max": 250.123,
    }
    assert results["tidegate"]["median"] == pytest.approx(255.25)
    assert results["overhead_ms"] == pytest.approx(255.25 - 245.062, abs=1e-3)
    assert results["target_met"] is True
    assert results["target_line"].endswith(": ok")
    assert len(data["runs"]) == 6
    assert data["runs"][0] == {"kind": "bare", "round": 1, "warmup": True, "ms": 300.0}
    assert data["commands"]["tidegate"].startswith(".venv/bin/python -m tidegate up ")
    assert str(_REPO) not in json.dumps(data)
    assert data["gates"] == {"max_overhead_ms": None, "missed": []}


def test_report_json_writes_a_missing_paired_figure_as_null() -> None:
    rep = _report(_samples([240.0], [250.0]))
    nan = Summary(rep.summary.bare, rep.summary.tidegate, 10.0, math.nan)
    data = json.loads(json.dumps(ColdstartReport(**{**_fields(rep), "summary": nan}).to_json()))
    assert data["results"]["paired_overhead_ms"] is None


def _fields(rep: ColdstartReport) -> dict[str, Any]:
    return {name: getattr(rep, name) for name in ColdstartReport.__slots__}


def test_markdown_report() -> None:
    samples = _samples(bare=[240.0, 250.0], tide=[251.5, 259.0], warmup=(300.0, 320.0))
    text = format_markdown(_report(samples, missed=["--max-overhead-ms 5: too slow"]))
    assert text.startswith("# Cold-start benchmark, 2026-01-02 03:04:05 UTC\n")
    assert "fewer than 10: indicative only" in text
    assert "| bare container | 245.0 | 249.0 | 240.0 | 250.0 | 2 |" in text
    assert "`overhead median 10.2 ms <= 25 ms: ok`" in text
    assert "| warm-up 1 | 300.0 | 320.0 | 20.0 |" in text
    assert "| 2 | 250.0 | 259.0 | 9.0 |" in text
    assert "- MISSED: --max-overhead-ms 5: too slow" in text
    assert "min_size: 0" in text
    assert str(_REPO) not in text


def test_write_names_the_files_by_utc_time(tmp_path: Path) -> None:
    rep = _report(_samples([240.0], [250.0]))
    json_path, md_path = coldstart.write(rep, tmp_path / "out")
    assert json_path.name == "coldstart-20260102T030405Z.json"
    assert md_path.name == "coldstart-20260102T030405Z.md"
    assert json.loads(json_path.read_text())["results"]["overhead_ms"] == 10.0


# --- the service file and the engine's answers ---------------------------------------------


def test_service_file_is_a_valid_scale_to_zero_docker_service(tmp_path: Path) -> None:
    path = tmp_path / "bench-coldstart.yaml"
    path.write_text(service_file("tidegate-test/httpd:0123456789abcdef"))
    (spec,) = load_service_files([path])
    assert spec.name == coldstart.SERVICE
    assert spec.runtime == "docker"
    assert spec.image == "tidegate-test/httpd:0123456789abcdef"
    assert spec.port == coldstart.CONTAINER_PORT
    assert (spec.autoscaling.min_size, spec.autoscaling.max_size) == (0, 1)
    assert spec.autoscaling.max_concurrency == 10
    assert spec.autoscaling.scale_down_delay == 1.0
    assert spec.health_check.protocol == "tcp"


def test_host_port_reads_the_published_port() -> None:
    attrs = {
        "NetworkSettings": {
            "Ports": {
                "8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "49153"}],
                "9000/tcp": None,
            }
        }
    }
    assert host_port(attrs) == 49153
    bad_attrs: list[dict[str, Any]] = [
        {},
        {"NetworkSettings": {"Ports": None}},
        {"NetworkSettings": {"Ports": {}}},
    ]
    for bad in bad_attrs:
        with pytest.raises(ValueError, match="not published"):
            host_port(bad)
    with pytest.raises(ValueError):
        host_port(attrs, "9000/tcp")
    empty = {"NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "", "HostPort": ""}]}}}
    with pytest.raises(ValueError):
        host_port(empty)


# --- the command line ----------------------------------------------------------------------


def test_flags_and_defaults() -> None:
    args = build_parser().parse_args(["coldstart"])
    assert (args.rounds, args.warmup, args.max_overhead_ms) == (10, 1, None)
    assert args.out == _REPO / "bench" / "results"
    args = build_parser().parse_args(
        ["coldstart", "--rounds", "3", "--warmup", "0", "--max-overhead-ms", "25", "--out", "x"]
    )
    assert (args.rounds, args.warmup, args.max_overhead_ms, args.out) == (3, 0, 25.0, Path("x"))


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--warmup", "-1"], ["--rounds", "x"]])
def test_bad_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["coldstart", *argv])
    assert exc.value.code == 2


# --- one real run --------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
def test_one_round_for_real(tmp_path: Path) -> None:
    """The whole benchmark, one round, no warm-up: exit 0 and a JSON with positive figures.

    Skipped, saying why, when no engine answers. Not the `images` fixture: that one also
    removes every test container on the engine, and this test starts none."""
    client = _docker_client()
    try:
        httpd = build_images(client).httpd
    finally:
        client.close()
    argv = ["coldstart", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *argv],
        cwd=_REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "overhead median" in done.stdout
    (path,) = tmp_path.glob("coldstart-*.json")
    data = json.loads(path.read_text())
    results = data["results"]
    for kind in (BARE, TIDEGATE):
        assert results[kind]["n"] == 1
        assert results[kind]["median"] > 0
        assert results[kind]["min"] == results[kind]["max"] == results[kind]["median"]
    assert results["overhead_ms"] == pytest.approx(
        results[TIDEGATE]["median"] - results[BARE]["median"], abs=2e-3
    )
    assert [(r["kind"], r["round"], r["warmup"]) for r in data["runs"]] == [
        (BARE, 1, False),
        (TIDEGATE, 1, False),
    ]
    assert all(r["ms"] > 0 for r in data["runs"])
    assert data["machine"]["versions"]["docker_engine"]
    assert data["settings"]["image"] == httpd
    assert (tmp_path / path.name.replace(".json", ".md")).is_file()
