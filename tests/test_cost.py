"""`tidegate cost`: App Runner's pricing (pure), the usage-record reader, and the command.

The prices are App Runner's public ones (0.064 USD per vCPU-hour active, 0.007 USD per GB-hour
provisioned); every expected figure below is worked out by hand from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scaler.cost import ZERO, Cost, always_on, price
from scaler.costcmd import UsageRecord, log_files, read_usage, summarize
from scaler.logs import parse_since, parse_time
from tidegate.cli import main

HOUR = 3600.0
GB = 1_000_000_000
T0 = parse_time("2026-11-26T00:00:00Z")


# -- pricing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("active_h", "provisioned_h", "cpu", "memory", "vcpu_h", "gb_h", "compute", "memory_usd"),
    [
        pytest.param(1, 1, 1, 2 * GB, 1, 2, 0.064, 0.014, id="an hour busy, 1 vCPU 2 GB"),
        pytest.param(0, 24, 0.5, 1 * GB, 0, 24, 0, 0.168, id="a day idle: memory only"),
        pytest.param(8, 24, 0.25, GB // 2, 2, 12, 0.128, 0.084, id="8 h of 24 active"),
        pytest.param(720, 720, 2, 4 * GB, 1440, 2880, 92.16, 20.16, id="30 days busy, 2 vCPU 4 GB"),
        pytest.param(1, 1, 1, 1024**3, 1, 1.073741824, 0.064, 0.007516192768, id="GiB is not GB"),
        pytest.param(0, 0, 1, 2 * GB, 0, 0, 0, 0, id="nothing provisioned"),
    ],
)
def test_price(
    active_h: float,
    provisioned_h: float,
    cpu: float,
    memory: int,
    vcpu_h: float,
    gb_h: float,
    compute: float,
    memory_usd: float,
) -> None:
    """vCPU is billed while active; memory (in 10^9-byte GB) for all the provisioned time."""
    cost = price(active_h * HOUR, provisioned_h * HOUR, cpu, memory)
    assert cost.vcpu_hours == pytest.approx(vcpu_h, rel=1e-12, abs=1e-12)
    assert cost.gb_hours == pytest.approx(gb_h, rel=1e-12, abs=1e-12)
    assert cost.compute_usd == pytest.approx(compute, rel=1e-12, abs=1e-12)
    assert cost.memory_usd == pytest.approx(memory_usd, rel=1e-12, abs=1e-12)
    assert cost.total_usd == pytest.approx(compute + memory_usd, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    ("period_h", "cpu", "memory", "instances", "total"),
    [
        pytest.param(24, 1, 2 * GB, 1, 1.872, id="a day, 1 vCPU 2 GB: 1.536 + 0.336"),
        pytest.param(24, 1, 2 * GB, 3, 5.616, id="three of them"),
        pytest.param(720, 0.25, GB // 2, 1, 14.04, id="30 days, 0.25 vCPU 0.5 GB"),
    ],
)
def test_always_on(period_h: float, cpu: float, memory: int, instances: int, total: float) -> None:
    """The always-on alternative bills every instance as active for the whole period."""
    cost = always_on(period_h * HOUR, cpu, memory, instances)
    assert cost.vcpu_hours == pytest.approx(period_h * cpu * instances)
    assert cost.total_usd == pytest.approx(total, rel=1e-12)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param((-1.0, 1.0, 1.0, GB), id="negative active"),
        pytest.param((1.0, 1.0, -1.0, GB), id="negative cpu"),
        pytest.param((2.0, 1.0, 1.0, GB), id="more active than provisioned"),
    ],
)
def test_price_rejects_impossible_quantities(args: tuple[float, float, float, float]) -> None:
    """Negative quantities and active time beyond provisioned time are errors, not bills."""
    with pytest.raises(ValueError):
        price(*args)
    with pytest.raises(ValueError):
        always_on(HOUR, 1.0, GB, instances=0)


def test_costs_add_up() -> None:
    """Costs of two sizes add quantity by quantity; ZERO is the identity."""
    total = ZERO + price(HOUR, 2 * HOUR, 1.0, GB) + price(0.0, HOUR, 2.0, 4 * GB)
    assert total == Cost(vcpu_hours=1.0, gb_hours=6.0)
    assert total.total_usd == pytest.approx(0.064 + 0.042)


# -- reading --------------------------------------------------------------------------------


def usage(when: str, active: float, idle: float, cpu: float = 1, memory: int = 2 * GB) -> str:
    return json.dumps(
        {
            "time": when,
            "event": "usage",
            "active_seconds": active,
            "idle_seconds": idle,
            "cpu": cpu,
            "memory_bytes": memory,
        }
    )


def write_logs(log_dir: Path, service: str, files: dict[str, list[str]]) -> Path:
    directory = log_dir / service
    directory.mkdir(parents=True, exist_ok=True)
    for name, lines in files.items():
        (directory / name).write_text("".join(line + "\n" for line in lines))
    return directory


def test_log_files_are_read_oldest_first(tmp_path: Path) -> None:
    """Rotated files come first, highest number first, then system.log; others are ignored."""
    directory = write_logs(
        tmp_path,
        "hello",
        {
            "system.log": [usage("2026-11-26T04:00:00Z", 4, 0)],
            "system.log.1": [usage("2026-11-26T03:00:00Z", 3, 0)],
            "system.log.3": [usage("2026-11-26T01:00:00Z", 1, 0)],
            "system.log.2": [usage("2026-11-26T02:00:00Z", 2, 0)],
            "system.log.old": ["ignored"],
            "access.log": ["ignored"],
        },
    )
    files = log_files(tmp_path, "hello")
    assert [f.name for f in files] == ["system.log.3", "system.log.2", "system.log.1", "system.log"]
    read = read_usage(files)
    assert [r.active_seconds for r in read.records] == [1, 2, 3, 4]
    assert read.files == [directory / f.name for f in files]
    assert log_files(tmp_path, "other") == []


def test_reader_skips_other_events_and_counts_malformed_lines(tmp_path: Path) -> None:
    """Other events and blank lines are skipped quietly; each line that is not JSON, not an
    object, or a usage record with a missing, mistyped or impossible field is counted."""
    write_logs(
        tmp_path,
        "hello",
        {
            "system.log": [
                usage("2026-11-26T00:00:00.123Z", 1.5, 58.5, cpu=0.5, memory=GB),
                json.dumps({"time": "2026-11-26T00:00:01Z", "event": "scale", "reason": "x"}),
                "",
                "not json",
                "[1, 2]",
                '{"time": "2026-11-26T00:00:02Z", "event": "usage", "active_seconds": 1',  # cut
                json.dumps({"time": "2026-11-26T00:00:03Z", "event": "usage"}),
                usage("2026-11-26 00:00:04", 1, 1),  # no zone
                usage("yesterday", 1, 1),
                usage("2026-11-26T00:00:05Z", -1, 1),
                usage("2026-11-26T00:00:06Z", True, 1),  # a bool is no number
                usage("2026-11-26T00:00:07Z", float("nan"), 1),
                usage("2026-11-26T00:00:08+01:00", 2, 3),
            ]
        },
    )
    (tmp_path / "hello" / "system.log").open("ab").write(b"\xff\xfe\n")
    read = read_usage(log_files(tmp_path, "hello"))
    assert read.malformed == 10
    assert read.records == [
        UsageRecord(T0 + 0.123, 1.5, 58.5, 0.5, float(GB)),
        UsageRecord(T0 + 8 - 3600, 2.0, 3.0, 1.0, float(2 * GB)),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("24h", T0 - 24 * HOUR, id="hours"),
        pytest.param("90m", T0 - 90 * 60, id="minutes"),
        pytest.param("7d", T0 - 7 * 24 * HOUR, id="days"),
        pytest.param("1.5d", T0 - 36 * HOUR, id="fractional days"),
        pytest.param("2026-11-25T12:00:00Z", T0 - 12 * HOUR, id="RFC 3339"),
        pytest.param("2026-11-25T12:00:00+02:00", T0 - 14 * HOUR, id="RFC 3339 with offset"),
    ],
)
def test_parse_since(text: str, expected: float) -> None:
    """--since takes a duration ago (h, m, s, d) or an RFC 3339 time."""
    assert parse_since(text, now=T0) == expected


@pytest.mark.parametrize("text", ["yesterday", "-1h", "2026-11-25T12:00:00", ""])
def test_parse_since_rejects(text: str) -> None:
    """Anything else is an error naming the forms it takes (a time needs its zone)."""
    with pytest.raises(ValueError, match="not a duration or a time"):
        parse_since(text, now=T0)


# -- summing --------------------------------------------------------------------------------


def record(
    hours: float, active: float, idle: float, cpu: float = 1.0, gb: float = 2.0
) -> UsageRecord:
    return UsageRecord(T0 + hours * HOUR, active * HOUR, idle * HOUR, cpu, gb * GB)


def test_summary_prices_each_record_at_its_size() -> None:
    """Records are summed in time order, each priced at its own size; the always-on
    alternative takes the latest size over the period from the first to the last record."""
    records = [
        record(2, 1, 1, cpu=2.0, gb=4.0),  # the period's first: it starts here
        record(1, 0, 0),
        record(3, 0.5, 0.5),
    ]
    summary = summarize(records)
    assert summary is not None
    assert (summary.start, summary.end, summary.records) == (T0 + HOUR, T0 + 3 * HOUR, 3)
    assert (summary.active_seconds, summary.idle_seconds) == (1.5 * HOUR, 1.5 * HOUR)
    # vCPU-h: 2 x 1 + 1 x 0.5 = 2.5; GB-h: 4 x 2 + 2 x 1 = 10
    assert summary.cost == Cost(vcpu_hours=2.5, gb_hours=10.0)
    assert (summary.cpu, summary.memory_bytes, summary.sizes) == (1.0, 2.0 * GB, 2)
    assert summary.period_seconds == 2 * HOUR
    assert summary.always_on() == Cost(vcpu_hours=2.0, gb_hours=4.0)


def test_summary_since_starts_at_the_record_before() -> None:
    """With since, records before it are left out, and the period starts at the last of them:
    where the first chosen record's increments began."""
    records = [record(h, 0.1, 0.9) for h in range(1, 25)]
    summary = summarize(records, since=T0 + 20.5 * HOUR)
    assert summary is not None
    assert summary.records == 4  # 21, 22, 23, 24
    assert (summary.start, summary.end) == (T0 + 20 * HOUR, T0 + 24 * HOUR)
    assert summary.active_seconds == pytest.approx(0.4 * HOUR)
    assert summarize(records, since=T0 + 25 * HOUR) is None
    assert summarize([]) is None


# -- the command ----------------------------------------------------------------------------


def day_of_usage(log_dir: Path) -> None:
    """24 hourly records for `hello`, 1 vCPU 2 GB, 6 minutes of each hour active, in a
    rotated and a current file, with one malformed line."""
    lines = [usage("2026-11-26T00:00:00Z", 0, 0)]
    lines += [usage(f"2026-11-26T{h:02d}:00:00Z", 360, 3240) for h in range(1, 24)]
    lines.append(usage("2026-11-27T00:00:00Z", 360, 3240))
    write_logs(
        log_dir, "hello", {"system.log.1": lines[:12], "system.log": [*lines[12:], "garbage"]}
    )


def test_cost_command_prints_the_formula_and_the_alternative(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A day with 2.4 of 24 instance-hours active: 0.1536 + 0.3360 USD against 1.8720
    always on; the period, the hours, the formula and the skipped line are shown."""
    day_of_usage(tmp_path)
    assert main(["cost", "hello", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for expected in (
        "service hello: 2026-11-26 00:00:00 UTC to 2026-11-27 00:00:00 UTC (24.00 h; "
        "25 usage record(s), all records)",
        "instance-hours: 2.4000 active, 21.6000 idle, 24.0000 provisioned",
        "size: 1 vCPU, 2 GB memory per instance",
        "compute: 2.4000 vCPU-h x 0.064 = 0.1536 USD",
        "memory:  48.0000 GB-h x 0.007 = 0.3360 USD",
        "total:   0.4896 USD",
        "24.0000 vCPU-h x 0.064 + 48.0000 GB-h x 0.007 = 1.8720 USD",
        "saving: 1.3824 USD (73.8% of always on)",
        "note: 1 malformed line(s) skipped",
    ):
        assert expected in out, expected


def test_cost_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--json carries the same figures for scripts; --since narrows the period."""
    day_of_usage(tmp_path)
    args = ["cost", "hello", "--log-dir", str(tmp_path), "--json"]
    assert main([*args, "--since", "2026-11-26T18:00:00Z", "--always-on-instances", "2"]) == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert (data["start"], data["end"]) == ("2026-11-26T17:00:00.000Z", "2026-11-27T00:00:00.000Z")
    assert data["since"] == "2026-11-26T18:00:00.000Z"
    assert (data["records"], data["malformed_lines"]) == (7, 1)
    assert data["period_seconds"] == 7 * HOUR
    assert data["active_instance_seconds"] == 7 * 360
    assert data["cost"]["vcpu_hours"] == pytest.approx(0.7)
    assert data["cost"]["total_usd"] == pytest.approx(0.7 * 0.064 + 14 * 0.007)
    assert data["always_on"]["instances"] == 2
    assert data["always_on"]["total_usd"] == pytest.approx(2 * 7 * (0.064 + 2 * 0.007))
    assert data["saving_usd"] == pytest.approx(
        data["always_on"]["total_usd"] - data["cost"]["total_usd"]
    )
    assert data["prices"] == {"vcpu_hour_usd": 0.064, "gb_hour_usd": 0.007, "bytes_per_gb": 1e9}


def test_cost_command_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No logs for the service, or no usage records in the period: exit 1, saying which."""
    day_of_usage(tmp_path)
    assert main(["cost", "nope", "--log-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tidegate cost: no logs for service 'nope' in {tmp_path}")

    assert main(["cost", "hello", "--log-dir", str(tmp_path), "--since", "2030-01-01T00:00Z"]) == 1
    err = capsys.readouterr().err
    assert "tidegate cost: no usage records for 'hello' since 2030-01-01 00:00:00 UTC" in err
    assert "1 malformed line(s) skipped" in err

    write_logs(tmp_path, "quiet", {"system.log": [json.dumps({"event": "start"})]})
    assert main(["cost", "quiet", "--log-dir", str(tmp_path)]) == 1
    assert "no usage records for 'quiet'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["../etc"], id="not a service name"),
        pytest.param(["hello", "--since", "soon"], id="bad --since"),
        pytest.param(["hello", "--always-on-instances", "0"], id="no instances"),
        pytest.param([], id="no service"),
    ],
)
def test_cost_command_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    """Usage errors exit 2 (argparse's, or --since's own message)."""
    day_of_usage(tmp_path)
    try:
        code = main(["cost", *args, "--log-dir", str(tmp_path)])
    except SystemExit as exc:
        code = int(exc.code or 0)
    assert code == 2
    assert "tidegate cost" in capsys.readouterr().err
