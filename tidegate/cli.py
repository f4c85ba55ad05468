"""The `tidegate` command: one console script, a subcommand per daemon or action.

Exit codes (contract, section 2): 0 success, 1 a failure explained on stderr, 2 a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ingress import cli as ingress_cli
from scaler import commands, logcmd, serve
from scaler import up as scaler_up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate",
        description="Self-hosted App Runner: request-driven autoscaling of containers on "
        "one Docker host, behind an HTTP/1.1 + TLS ingress.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    ingress_cli.add_parser(subparsers)
    scaler_up.add_parser(subparsers)
    serve.add_parser(subparsers)
    commands.add_parsers(subparsers)
    logcmd.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
