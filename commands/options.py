"""What every ``breakscene`` command shares: ``--version``, ``--log-level`` / ``-v``, and
help that shows each option's default.

``finish_parser`` is applied once to the finished parser (library, pipeline and study
commands alike), so a command added later gets the same options and help without extra code.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import logging
import re

from pydantic import BaseModel, ValidationError

from breakscene.errors import BreakSceneError

LEVELS = ("debug", "info", "warning", "error")
# the project's own loggers; third-party libraries stay at WARNING unless asked
PROJECT_LOGGERS = ("breakscene", "batchjob", "pipeline", "robustness", "commands", "benchmarks")
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def package_version() -> str:
    try:
        return importlib.metadata.version("breakscene")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser that keeps, as public attributes, what the command line walks
    later: its ``options`` (every action added), its sub-``commands`` by name and, for a
    sub-command, its ``summary`` (the ``help=`` of ``add_parser``), so that help, defaults,
    flag suggestions and the generated docs/cli.md never reach into argparse's private state."""

    def __init__(self, *args, **kwargs) -> None:
        self.options: list[argparse.Action] = []
        self.commands: dict[str, CommandParser] = {}
        self.summary: str | None = None  # a sub-command's one-line help in its parent's list
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.options.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        return self.recording(super().add_argument_group(*args, **kwargs))

    def add_mutually_exclusive_group(self, **kwargs):
        return self.recording(super().add_mutually_exclusive_group(**kwargs))

    def recording(self, group):
        """``group`` with its options kept in ``self.options`` too."""
        add = group.add_argument

        def add_argument(*args, **kwargs) -> argparse.Action:
            action = add(*args, **kwargs)
            self.options.append(action)
            return action

        group.add_argument = add_argument
        return group

    def add_subparsers(self, **kwargs):
        group = super().add_subparsers(parser_class=CommandParser, **kwargs)
        self.commands = group.choices  # name -> CommandParser, filled as add_parser is called
        add_parser = group.add_parser

        def add_parser_keeping_help(name, **options) -> CommandParser:
            parser = add_parser(name, **options)
            parser.summary = options.get("help")  # argparse keeps it only in private state
            return parser

        group.add_parser = add_parser_keeping_help
        return group

    def option_strings(self) -> set[str]:
        return {flag for action in self.options for flag in action.option_strings}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without "(default: None)", "(default: False)" or
    "(default: [])" noise: those options say in their help what leaving them out means."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or not _shows_default(action):
            return text
        return super()._get_help_string(action)


def _shows_default(action: argparse.Action) -> bool:
    default = action.default
    # identity, not ==: a default of 0 is worth showing, False is not
    return not (default is None or default is False or default is argparse.SUPPRESS or default == []
                or action.nargs == 0 or not action.option_strings)


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # On sub-commands the defaults are SUPPRESS so that `breakscene -v extract ...` is not
    # reset by the sub-command's own (absent) option.
    default = argparse.SUPPRESS if not top else None
    parser.add_argument("--log-level", type=str.lower, choices=LEVELS, default=default,
                        help="log level of the project's messages (default: warning; -v info, -vv debug)")
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS if not top else 0,
                        help="more log output: -v info, -vv debug (--log-level wins)")


def _show_in_help(parser: CommandParser) -> None:
    parser.formatter_class = HelpFormatter
    for action in parser.options:
        if action.help is None and _shows_default(action):
            action.help = "(default: %(default)s)"  # argparse lists no option without help text


def finish_parser(parser: CommandParser) -> CommandParser:
    """Add the shared options to ``parser`` and its sub-commands and show defaults in help."""
    if "--log-level" in parser.option_strings():
        return parser
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _common(parser, top=True)
    _show_in_help(parser)
    for sub in parser.commands.values():
        _common(sub, top=False)
        _show_in_help(sub)
    return parser


def log_level(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", None):
        return getattr(logging, args.log_level.upper())
    verbose = getattr(args, "verbose", 0) or 0
    return (logging.WARNING, logging.INFO)[verbose] if verbose < 2 else logging.DEBUG


def setup_logging(args: argparse.Namespace) -> int:
    level = log_level(args)
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level)
    return level


def show_defaults(parser: CommandParser, defaults: dict) -> None:
    """Options whose own default is None ("take it from the config") show the config's
    value in their help instead."""
    for action in parser.options:
        value = defaults.get(action.dest)
        if action.default is None and value is not None:
            action.help = f"{action.help + ' ' if action.help else ''}(default: {value})"


def validate_flags(model: type[BaseModel], values: dict):
    """``model`` validated from command-line values, or one BreakSceneError naming each bad
    flag with its value (``--guidance-scale nan: input should be a finite number``)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise BreakSceneError("; ".join(flag_problem(e) for e in exc.errors())) from None


def flag_problem(error: dict) -> str:
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a check across flags names them itself
        return message
    flag = "--" + str(error["loc"][0]).replace("_", "-")
    if error["type"] == "value_error":  # the project's own messages read on from the value
        return f"{flag} {error['input']} {message}"
    return f"{flag} {error['input']}: {message[:1].lower() + message[1:]}"


# a long option as typed: "--phase1_steps" or "--phase1-steps=3"
LONG_FLAG = re.compile(r"--[A-Za-z0-9][\w-]*")


def unknown_flags(parser: CommandParser, argv: list[str]) -> str | None:
    """Long options in ``argv`` that the chosen command does not have, each with the option it
    most likely meant (``--phase1_steps``, the diffusers / authors' spelling, is
    ``--phase1-steps``), or None. argparse itself would answer with the top-level usage."""
    command = next((a for a in argv if a in parser.commands), None)
    known = parser.option_strings() | (parser.commands[command].option_strings() if command else set())
    problems = []
    for token in argv[: argv.index("--")] if "--" in argv else argv:
        flag = token.split("=", 1)[0]
        if not LONG_FLAG.fullmatch(flag) or flag in known or _abbreviates(flag, known):
            continue
        guess = difflib.get_close_matches(flag.replace("_", "-").lower(), sorted(known), n=1, cutoff=0.6)
        where = f"breakscene {command}" if command else "breakscene"
        problems.append(f"{flag} is not an option of {where}: "
                        + (f"did you mean {guess[0]}?" if guess else f"see {where} --help"))
    return "; ".join(problems) or None


def _abbreviates(flag: str, known: set[str]) -> bool:
    """argparse accepts a unique prefix of a long option (``--phase1-step``)."""
    return sum(k.startswith(flag) for k in known if k.startswith("--")) == 1
