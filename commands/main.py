"""The ``breakscene`` console script: one parser for every command, one way to run them.

Each command module adds its sub-commands (the library's, the batch jobs', the study's
report); errors the user can fix become one ``error:`` line and an exit status.
"""
from __future__ import annotations

import logging
import sys

from breakscene.errors import BreakSceneError
from breakscene.interrupts import Stopped, as_stopped, stop_on_signals

from commands import jobs, library, report
from commands.options import CommandParser, finish_parser, package_version, setup_logging, unknown_flags

log = logging.getLogger("breakscene")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog="breakscene", description="Break-A-Scene at scale: single scenes, pipeline jobs, robustness reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    library.add_parsers(sub)
    jobs.add_parsers(sub)
    report.add_parsers(sub)
    return finish_parser(parser)


def run(parser: CommandParser, argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problem = unknown_flags(parser, argv)
    if problem:  # argparse would print the top-level usage and no hint
        print(f"error: {problem}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    setup_logging(args)
    log.debug("breakscene %s: %s", package_version(), args.command)
    try:
        with stop_on_signals():
            return args.func(args)
    except BreakSceneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except (Stopped, KeyboardInterrupt) as exc:
        stopped = as_stopped(exc)
        print(f"error: {stopped}: breakscene {args.command} did not finish; nothing half-written is left "
              f"(exit status {stopped.exit_status})", file=sys.stderr, flush=True)
        return stopped.exit_status


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
