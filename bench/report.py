"""Presenting a proxy benchmark: the stdout table, and the JSON and Markdown files.

The files carry what is needed to judge and reproduce a figure later: when and where it was
measured (CPU model, CPU count, tool versions), the exact commands and configuration files,
and every individual run besides the medians.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.proxy import LogCost, Measurement, Row

__all__ = [
    "ProxyReport",
    "format_markdown",
    "format_table",
    "log_cost_lines",
    "machine_info",
    "write",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
_COLUMNS = (
    "target",
    "body",
    "conns",
    "req/s",
    "p50 ms",
    "p99 ms",
    "x direct",
    "x nginx",
    "p99/nginx",
    "CPU us/req",
    "errors",
)


@dataclass(frozen=True, slots=True)
class ProxyReport:
    """Everything one `bench proxy` run produced, ready to be written out."""

    started_at: datetime
    machine: dict[str, Any]
    settings: dict[str, Any]
    commands: dict[str, list[str]]
    configs: dict[str, str]
    wrk_commands: list[list[str]]
    rows: Sequence[Row]
    runs: Sequence[Measurement]
    gates: dict[str, float | None]
    missed: list[str] = field(default_factory=list)
    log_costs: Sequence[LogCost] = ()

    def stamp(self) -> str:
        """UTC timestamp used in the file names, e.g. 20250101T120000Z."""
        return self.started_at.strftime("%Y%m%dT%H%M%SZ")

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "proxy",
            "date": self.started_at.isoformat(timespec="seconds"),
            "machine": self.machine,
            "settings": self.settings,
            "commands": {name: _shell(argv) for name, argv in self.commands.items()},
            "wrk_commands": [_shell(argv) for argv in self.wrk_commands],
            "configs": self.configs,
            "results": [asdict(row) for row in self.rows],
            "runs": [
                {
                    "target": m.target,
                    "body": m.cell.body,
                    "connections": m.cell.connections,
                    "round": m.round,
                    "command": _shell(m.command),
                    "cpu_s": m.cpu_s,
                    **asdict(m.result),
                }
                for m in self.runs
            ],
            "gates": {**self.gates, "missed": self.missed},
            "access_log_cost": [
                {
                    "body": c.cell.body,
                    "connections": c.cell.connections,
                    "rps_change": c.rps_change,
                    "cpu_us": c.cpu_us,
                    "cpu_us_log": c.cpu_us_log,
                    "cpu_change": c.cpu_change,
                    "rounds": c.rounds,
                }
                for c in self.log_costs
            ],
        }


# --- machine facts -------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    """First non-empty line a tool prints (on stdout or stderr), or "unknown"."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (done.stdout + "\n" + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(tools: Mapping[str, str]) -> dict[str, Any]:
    """CPU, CPU counts, kernel and tool versions of this machine."""
    return machine_with(
        {
            # nginx prints its version on stderr; wrk has no version flag but -v prints its
            # banner (and exits 1).
            "nginx": _first_line([tools["nginx"], "-v"]),
            "haproxy": _first_line([tools["haproxy"], "-v"]),
            "wrk": _first_line([tools["wrk"], "-v"]).split(" Copyright")[0],
        }
    )


def machine_with(versions: Mapping[str, str]) -> dict[str, Any]:
    """CPU, CPU counts, kernel, and ``versions`` with Python's and tidegate's commit added:
    what every benchmark records of the machine it ran on."""
    return {
        "cpu_model": _cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        # major.minor only: what matters for networking, not the build of one machine
        "kernel": ".".join(platform.release().split(".")[:2]),
        "versions": {
            **versions,
            "python": sys.version.split()[0],
            "tidegate_commit": _first_line(
                ["git", "-C", str(_REPO_ROOT), "describe", "--always", "--dirty"]
            ),
        },
    }


# --- formatting ----------------------------------------------------------------------------


_REPO = str(Path(__file__).resolve().parent.parent)


def _shell(argv: Sequence[str]) -> str:
    # paths inside the checkout are shown relative to it, so results read the same anywhere
    return shlex.join(a.replace(_REPO + "/", "") for a in argv)


def _fmt_ratio(value: float | None) -> str:
    # Two decimals hide small ratios (direct's 1-connection p99 is ~1% of a proxy's).
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def _cells(row: Row) -> list[str]:
    errors = f"{row.socket_errors} sock, {row.non_2xx} non-2xx" if row.flagged else ""
    return [
        row.target,
        row.body,
        str(row.connections),
        f"{row.rps:.0f}",
        f"{row.p50_ms:.3f}",
        f"{row.p99_ms:.3f}",
        _fmt_ratio(row.rps_vs_direct),
        _fmt_ratio(row.rps_vs_nginx),
        _fmt_ratio(row.p99_vs_nginx),
        "-" if row.cpu_us is None else f"{row.cpu_us:.1f}",
        errors,
    ]


def format_table(rows: Sequence[Row], pinning: str) -> str:
    """Fixed-width text table, numbers right-aligned, a blank line between cells."""
    body = [_cells(r) for r in rows]
    widths = [max(len(c) for c in col) for col in zip(_COLUMNS, *body, strict=False)]
    numeric = range(2, 10)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [f"CPU: {pinning}", "", line(_COLUMNS), line(["-" * w for w in widths])]
    previous: tuple[str, int] | None = None
    for row, cells in zip(rows, body, strict=True):
        if previous is not None and previous != (row.body, row.connections):
            out.append("")
        previous = (row.body, row.connections)
        out.append(line(cells))
    if any(r.flagged for r in rows):
        out.append("\nrows with errors are not trustworthy: see the errors column")
    return "\n".join(out)


def log_cost_lines(costs: Sequence[LogCost]) -> list[str]:
    """One line per cell: what tidegate+log costs against tidegate."""
    out = ["access log cost (tidegate+log against tidegate, median of each round's pair):"]
    for c in costs:
        line = f"  {c.cell}: req/s {c.rps_change:+.1%}"
        if c.cpu_us is not None and c.cpu_us_log is not None and c.cpu_change is not None:
            line += f", CPU {c.cpu_us:.1f} -> {c.cpu_us_log:.1f} us/req ({c.cpu_change:+.1%})"
        out.append(f"{line} over {c.rounds} round(s)")
    return out


def format_markdown(rep: ProxyReport) -> str:
    """The report as a Markdown page: context, the table, gates, exact commands."""
    m = rep.machine
    v = m["versions"]
    lines = [
        f"# Proxy benchmark, {rep.started_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        f"- CPU: {m['cpu_model']}, nproc {m['nproc']} ({rep.settings['cpu_pinning']})",
        f"- kernel {m['kernel']}; {v['nginx']}; {v['haproxy']}; {v['wrk']}; "
        f"Python {v['python']}; tidegate {v['tidegate_commit']}",
        f"- {rep.settings['duration_s']} s per run after {rep.settings['warmup_s']} s warm-up, "
        f"{rep.settings['rounds']} round(s), medians; targets interleaved within each cell",
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "--:" for i in range(len(_COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rep.rows]
    if rep.log_costs:
        lines += ["", "## Access log cost", ""]
        lines += [f"- {line.strip()}" for line in log_cost_lines(rep.log_costs)[1:]]
        lines += [
            "",
            "Each round's tidegate and tidegate+log runs are paired (they ran back to back); "
            "the change is the median over rounds. CPU per request is the target's processes' "
            "user and system time over its requests.",
        ]
    lines += ["", "## SLO gates", ""]
    set_gates = {k: g for k, g in rep.gates.items() if g is not None}
    if not set_gates:
        lines.append("none set")
    else:
        lines.append(", ".join(f"{k} = {g:g}" for k, g in set_gates.items()))
        lines += [""] + ([f"- MISSED: {msg}" for msg in rep.missed] or ["- all passed"])
    lines += ["", "## Commands", "", "```"]
    lines += [f"# {name}\n{_shell(argv)}" for name, argv in rep.commands.items()]
    lines += ["# wrk, round 1 (each preceded by a warm-up run with the same arguments)"]
    lines += [_shell(argv) for argv in rep.wrk_commands]
    lines += ["```", ""]
    for name, text in rep.configs.items():
        lines += [f"### {name} configuration", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines)


def write(rep: ProxyReport, out_dir: Path) -> tuple[Path, Path]:
    """Write proxy-<stamp>.json and .md into `out_dir`; return their paths."""
    return write_pair(out_dir, f"proxy-{rep.stamp()}", rep.to_json(), format_markdown(rep))


def write_pair(
    out_dir: Path, name: str, data: Mapping[str, Any], markdown: str
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into `out_dir` (made if missing); return them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / name
    json_path, md_path = base.with_suffix(".json"), base.with_suffix(".md")
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def commands_markdown(
    commands: Mapping[str, Sequence[str]], service: str, service_file: str
) -> list[str]:
    """The Markdown lines that record how a run was made: its commands and service file."""
    lines = ["## Commands", "", "```"]
    lines += [f"# {name}\n{_shell(argv)}" for name, argv in commands.items()]
    lines += ["```", "", f"### {service}.yaml", "", "```yaml", service_file.rstrip(), "```"]
    return lines
