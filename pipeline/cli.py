"""The ``breakscene`` console script: the library's commands plus the pipeline's."""
from __future__ import annotations

import sys

from breakscene import cli as library_cli


def build_parser():
    parser = library_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    from . import commands

    commands.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    return library_cli.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
