"""`python -m bench all`: proxy, coldstart and scaleout one after the other, then a summary.

Each benchmark runs with the arguments below, chosen so that the three fit in well under
10 minutes; `--proxy-args`, `--coldstart-args` and `--scaleout-args` replace them (a quoted
string, split like a shell would):

    proxy       --duration 5 --warmup 1   (the whole matrix, 5 s a cell: about 2.5 minutes)
    coldstart   --rounds 10               (about 40 s)
    scaleout    --max-errors 0            (about 1 minute; a failed request is a tidegate bug)

`--out DIR` is passed to each. Gates go in the benchmark's own arguments, e.g.
`--proxy-args "--duration 5 --min-ratio-nginx 0.55"`.

A benchmark that cannot run (exit 2) does not stop the others; Ctrl-C does (every process
the running one started is stopped first). At the end: one line per benchmark (exit status,
wall time, its headline figure, its result files), a check that none of the benchmarks'
processes or containers is left, and `all-<time>.json` and `.md` beside the results.

Exit status: the worst of the benchmarks' (2 could not run, then 1 a gate missed, then 0),
2 if anything was left running, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import coldstart, install, procs, proxy, scaleout, wrk

__all__ = [
    "BENCHMARKS",
    "DEFAULT_ARGS",
    "Outcome",
    "add_arguments",
    "format_markdown",
    "format_summary",
    "headline",
    "main",
    "overall_status",
    "parse_benchmark_args",
]

BENCHMARKS: dict[str, ModuleType] = {
    "proxy": proxy,
    "coldstart": coldstart,
    "scaleout": scaleout,
}
DEFAULT_ARGS: dict[str, str] = {
    "proxy": "--duration 5 --warmup 1",
    "coldstart": "--rounds 10",
    "scaleout": "--max-errors 0",
}
_DEFAULT_OUT = Path(__file__).resolve().parent / "results"
# Container labels the benchmarks put on (or make tidegate put on) what they start.
_LEFTOVER_LABELS = (
    "tidegate.scope=bench-scaleout",
    "tidegate.scope=bench-coldstart",
    "tidegate.bench",
)


@dataclass(slots=True)
class Outcome:
    """How one benchmark went."""

    name: str
    args: list[str]
    status: int | None = None  # None: not run (interrupted before it)
    seconds: float = 0.0
    headline: str = ""
    error: str = ""
    files: list[str] = field(default_factory=list)


def parse_benchmark_args(name: str, text: str, out: Path | None) -> argparse.Namespace:
    """`text` parsed by benchmark `name`'s own parser (a usage error exits 2, as there)."""
    parser = argparse.ArgumentParser(prog=f"python -m bench {name}")
    BENCHMARKS[name].add_arguments(parser)
    argv = shlex.split(text)
    if out is not None and "--out" not in argv:
        argv += ["--out", str(out)]
    return parser.parse_args(argv)


def overall_status(statuses: Sequence[int | None]) -> int:
    """The worst: 2 (could not run, or anything else unexpected), then 1, then 0."""
    ran = [s for s in statuses if s is not None]
    if any(s not in (0, 1) for s in ran):
        return 2
    return max(ran, default=0)


def _proxy_headline(data: Mapping[str, Any]) -> str:
    rows = [
        r
        for r in data.get("results", [])
        if r.get("target") == "tidegate" and r.get("body") == "small" and r.get("connections") == 50
    ]
    if not rows:
        return "no tidegate small/50 figure"
    r = rows[0]
    rps, p99 = r.get("rps_vs_nginx"), r.get("p99_vs_nginx")
    if rps is None:
        return f"tidegate small/50: {r['rps']:.0f} req/s (no nginx to compare)"
    text = f"tidegate small/50: {rps:.2f}x nginx's req/s"
    if p99 is not None:
        text += f", p99 {p99:.2f}x nginx's"
    return text


def headline(name: str, data: Mapping[str, Any]) -> str:
    """The one figure per benchmark the summary shows, from its JSON result."""
    if name == "proxy":
        text = _proxy_headline(data)
    elif name == "coldstart":
        text = str(data.get("results", {}).get("target_line", ""))
    elif name == "scaleout":
        text = str(data.get("summary", {}).get("headline", ""))
    else:
        text = ""
    missed = data.get("gates", {}).get("missed") or []
    if missed:
        text += f"; {len(missed)} gate(s) missed"
    return text


def _new_results(out: Path, name: str, since: float) -> list[Path]:
    if not out.is_dir():
        return []
    return sorted(
        p for p in out.glob(f"{name}-*") if p.is_file() and p.stat().st_mtime >= since - 1
    )


def _run_one(name: str, args: argparse.Namespace, out: Path) -> Outcome:
    outcome = Outcome(name, [])
    run: Callable[[argparse.Namespace], int] = BENCHMARKS[name].main
    print(f"\n=== bench {name} ===", file=sys.stderr, flush=True)
    since = time.time()
    t0 = time.monotonic()
    try:
        outcome.status = int(run(args))
    except (install.ToolsMissing, procs.StartError, wrk.WrkError) as exc:
        outcome.status, outcome.error = 2, str(exc)
        print(f"bench {name}: error: {exc}", file=sys.stderr)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a bug in one benchmark must not stop the others
        outcome.status, outcome.error = 2, f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    finally:
        outcome.seconds = time.monotonic() - t0
    files = _new_results(out, name, since)
    outcome.files = [p.name for p in files]
    for path in files:
        if path.suffix == ".json":
            try:
                outcome.headline = headline(name, json.loads(path.read_text()))
            except (OSError, ValueError) as exc:
                outcome.headline = f"unreadable result: {exc}"
    return outcome


def leftovers() -> list[str]:
    """What the benchmarks may have left: our child processes, and their containers."""
    found = []
    me = os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            found.append(f"process {stat.parent.name}")
    try:
        import docker

        client = docker.from_env(timeout=30)
        try:
            for label in _LEFTOVER_LABELS:
                for c in client.containers.list(all=True, filters={"label": [label]}):
                    found.append(f"container {c.name} ({label})")
        finally:
            client.close()
    except Exception as exc:  # no engine: then no container can be left either
        if "docker" in sys.modules and not isinstance(exc, ImportError):
            print(f"bench all: could not list containers: {exc}", file=sys.stderr)
    return sorted(set(found))


def format_summary(outcomes: Sequence[Outcome], total_s: float, left: Sequence[str]) -> str:
    lines = ["", "bench all: summary", ""]
    for o in outcomes:
        state = "not run" if o.status is None else f"exit {o.status}"
        lines.append(f"{o.name:<10} {state:<8} {o.seconds:6.1f} s  {o.headline or o.error}")
        for name in o.files:
            lines.append(f"{'':<10} {name}")
    lines.append("")
    lines.append(f"wall time: {total_s:.1f} s")
    lines.append("left running: nothing" if not left else "LEFT RUNNING: " + ", ".join(left))
    return "\n".join(lines)


def format_markdown(
    started_at: datetime, outcomes: Sequence[Outcome], total_s: float, left: Sequence[str]
) -> str:
    lines = [
        f"# All benchmarks, {started_at.strftime('%Y-%m-%d %H:%M:%S')} UTC",
        "",
        f"Wall time {total_s:.0f} s; left running: {', '.join(left) or 'nothing'}.",
        "",
        "| benchmark | arguments | exit | seconds | headline | results |",
        "|---|---|--:|--:|---|---|",
    ]
    for o in outcomes:
        status = "-" if o.status is None else str(o.status)
        files = ", ".join(f"[{n}]({n})" for n in o.files if n.endswith(".md"))
        lines.append(
            f"| {o.name} | `{shlex.join(o.args)}` | {status} | {o.seconds:.0f} | "
            f"{o.headline or o.error} | {files} |"
        )
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `all` subcommand's flags."""
    for name, default in DEFAULT_ARGS.items():
        parser.add_argument(
            f"--{name}-args",
            default=default,
            metavar="ARGS",
            help=f"arguments for `bench {name}` (default: %(default)r)",
        )
    parser.add_argument(
        "--only",
        default=",".join(BENCHMARKS),
        metavar="LIST",
        help="comma-separated benchmarks to run, in this order (default %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=_DEFAULT_OUT,
        metavar="DIR",
        help="where every result goes (default bench/results)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmarks, then the summary; the worst exit status."""
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown or not names:
        print(
            f"bench all: --only: unknown {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(BENCHMARKS)}",
            file=sys.stderr,
        )
        return 2
    texts = {name: getattr(args, f"{name}_args") for name in names}
    # every benchmark's arguments are checked before the first one runs
    parsed = {name: parse_benchmark_args(name, texts[name], args.out) for name in names}
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    outcomes = [Outcome(name, shlex.split(texts[name])) for name in names]
    try:
        for i, name in enumerate(names):
            done = _run_one(name, parsed[name], args.out)
            done.args = outcomes[i].args
            outcomes[i] = done
    finally:
        total = time.monotonic() - t0
        left = leftovers()
        print(format_summary(outcomes, total, left))
        stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
        args.out.mkdir(parents=True, exist_ok=True)
        base = args.out / f"all-{stamp}"
        doc = {
            "benchmark": "all",
            "date": started_at.isoformat(timespec="seconds"),
            "wall_time_s": round(total, 1),
            "left_running": left,
            "benchmarks": [asdict(o) for o in outcomes],
        }
        base.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
        base.with_suffix(".md").write_text(format_markdown(started_at, outcomes, total, left))
        print(f"\nwrote {base}.json\n      {base}.md")
    status = overall_status([o.status for o in outcomes])
    return 2 if left else status
