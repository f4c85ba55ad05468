"""`python -m bench <benchmark>`: tidegate's benchmarks.

Each benchmark is a module with `add_arguments(parser)` and `main(args) -> int`, registered in
`_BENCHMARKS`; `all` (bench/all.py) runs the others one after the other.

Exit status: 0 when the run completed and every SLO gate given passed, 1 when a gate was
missed, 2 when the benchmark could not run (a tool missing, a server that failed to start,
wrk failing), 130 on Ctrl-C, 128+N on a fatal signal N. Whatever the exit, every process the
benchmark started is stopped and its temp dir removed first.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from types import FrameType, ModuleType

from bench import all as all_
from bench import coldstart, install, procs, proxy, scaleout, wrk

# name -> (module, one-line help); the module provides add_arguments and main.
_BENCHMARKS: dict[str, tuple[ModuleType, str]] = {
    "proxy": (proxy, "ingress throughput and latency next to nginx and HAProxy"),
    "coldstart": (coldstart, "what tidegate adds to a cold start, next to a bare container"),
    "scaleout": (scaleout, "a step and a ramp load from idle: errors, latency, instances, queue"),
    "all": (all_, "proxy, coldstart and scaleout in one go, with a summary"),
}


def _exit_on_signal(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM and SIGHUP would otherwise end Python without unwinding, leaving the servers
    # under test running; as SystemExit they go through every cleanup handler.
    raise SystemExit(128 + signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (module, help_text) in _BENCHMARKS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=module.__doc__)
        sub_parser.formatter_class = argparse.RawDescriptionHelpFormatter
        module.add_arguments(sub_parser)
        run: Callable[[argparse.Namespace], int] = module.main
        sub_parser.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130
    except (install.ToolsMissing, procs.StartError, wrk.WrkError) as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
