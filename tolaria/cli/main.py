"""Argument parsing and dispatch for the ``tolaria`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tolaria.cli.demo import add_demo_arguments, run_demo
from tolaria.cli.errors import EXIT_FAILURE, EXIT_HALTED, EXIT_OK, EXIT_USAGE, UsageError
from tolaria.config import AGGREGATORS
from tolaria.report import ReportInputError, run_report

__all__ = ["EXIT_FAILURE", "EXIT_HALTED", "EXIT_OK", "EXIT_USAGE", "UsageError", "build_parser", "main"]

logger = logging.getLogger("tolaria.cli")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of the ``tolaria`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="tolaria", description="Multi-objective PyTorch training that does not fail silently."
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="level of log messages written to standard error (default: WARNING; INFO adds run "
        "start and stop, checkpoints and worker lifecycle)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="train the multi-task digits network (the main job)",
        description="Train a shared MLP with digit, parity and high heads on scikit-learn's bundled digits. "
        f"Aggregators: {', '.join(AGGREGATORS)}.",
    )
    add_demo_arguments(demo)
    report = commands.add_parser(
        "report",
        help="summarise a run folder and plot it to RUN_DIR/report.png",
        description="Read RUN_DIR/telemetry.jsonl, print a summary table and write RUN_DIR/report.png "
        "(needs the 'plot' extra: pip install 'tolaria[plot]').",
    )
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder written by a tolaria run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code (see the package docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits 2 on bad options and 0 for --help; keep its code.
        return int(exit_request.code or 0)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "demo":
            return run_demo(args)
        if args.command == "report":
            return run_report(args.run_dir)
    except (UsageError, ReportInputError) as error:
        print(f"tolaria {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"tolaria {args.command}: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE
