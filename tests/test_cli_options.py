"""The options every command shares: --version, --log-level / -v, defaults shown in --help."""
import importlib.metadata
import logging
import re
import subprocess
import sys

import pytest

from breakscene.config import ExtractConfig
from conftest import ROOT
from commands.main import build_parser, main

VERSION = importlib.metadata.version("breakscene")
COMMANDS = ["extract", "generate", "run", "submit", "report"]


@pytest.fixture(autouse=True)
def restore_log_levels():
    names = ("breakscene", "pipeline", "benchmarks")
    before = {n: logging.getLogger(n).level for n in names}
    yield
    for name, level in before.items():
        logging.getLogger(name).setLevel(level)


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_version_comes_from_the_package_metadata(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"breakscene {VERSION}"
    proc = subprocess.run([sys.executable, "-m", "commands.main", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"breakscene {VERSION}"


def test_help_shows_defaults_and_never_none(capsys):
    cfg = ExtractConfig()
    extract = " ".join(_help(capsys, "extract").split())  # argparse wraps lines
    assert f"--phase1-steps PHASE1_STEPS steps training only the new token rows (default: {cfg.phase1_steps})" \
        in extract
    assert f"--lambda-attn LAMBDA_ATTN weight of the cross-attention loss (default: {cfg.lambda_attn})" in extract
    assert (f"--num-class-images NUM_CLASS_IMAGES class images for prior preservation "
            f"(default: {cfg.prior.num_class_images})") in extract
    assert "(default: stabilityai/stable-diffusion-2-1-base)" in extract.replace("stable- diffusion", "stable-diffusion")
    generate = " ".join(_help(capsys, "generate").split())
    assert "--seed SEED 0 to 4294967295 (default: 0)" in generate
    assert re.search(r"--num-images NUM_IMAGES .*\(default: 1\)", generate)
    assert "--gradient-checkpointing {auto,on,off}" in extract and "(default: auto)" in extract
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(COMMANDS) <= set(commands)
    for command in ["", *commands]:
        text = _help(capsys, *([command] if command else []))
        assert "(default: None)" not in text and "(default: False)" not in text and "(default: [])" not in text
        assert "--log-level" in text and "-v, --verbose" in text


@pytest.mark.parametrize(("argv", "level"), [
    ([], logging.WARNING),
    (["-v"], logging.INFO),
    (["-vv"], logging.DEBUG),
    (["--log-level", "error"], logging.ERROR),
    (["--log-level", "ERROR", "-vv"], logging.ERROR),  # the explicit level wins
])
def test_log_level_and_verbose_set_the_project_loggers(argv, level, tmp_path, caplog):
    missing = str(tmp_path / "no-study")
    for where in ("before", "after"):  # `breakscene -v report ...` and `breakscene report -v ...`
        args = [*argv, "report", missing, "--out", str(tmp_path / "r")] if where == "before" else \
            ["report", *argv, missing, "--out", str(tmp_path / "r")]
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            assert main(args) == 2
        for name in ("breakscene", "pipeline"):
            assert logging.getLogger(name).level == level, (where, name)
        debug_lines = [r for r in caplog.records if r.name == "breakscene" and r.levelno == logging.DEBUG]
        assert bool(debug_lines) == (level == logging.DEBUG), where


def test_log_output_reaches_stderr_of_the_console_script(tmp_path):
    cmd = [sys.executable, "-m", "commands.main", "--log-level", "debug", "report", str(tmp_path / "x"),
           "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"DEBUG breakscene: breakscene {VERSION}: report" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no study measurements")
    quiet = subprocess.run(cmd[:3] + cmd[5:], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2 and "DEBUG" not in quiet.stderr


def test_a_bad_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--log-level", "loud", "report", "x", "--out", "y"])
    assert exc.value.code == 2
    assert "invalid choice: 'loud'" in capsys.readouterr().err


def test_finishing_the_parser_twice_is_harmless():
    from commands.options import finish_parser

    parser = finish_parser(finish_parser(build_parser()))
    assert parser.parse_args(["-v", "report", "x", "--out", "y"]).verbose == 1


@pytest.mark.parametrize("argv,hint", [
    (["extract", "--scene", "s", "--out", "o", "--phase1_steps", "3"], "--phase1_steps is not an option of "
                                                                       "breakscene extract: did you mean --phase1-steps?"),
    (["extract", "--scene", "s", "--outptu", "o"], "--outptu is not an option of breakscene extract: did you mean --output?"),
    (["run", "job.yaml", "--stop_after", "score"], "--stop_after is not an option of breakscene run: did you mean "
                                                  "--stop-after?"),
    (["generate", "--bundel", "b", "--prompt", "p", "--out", "o.png"], "did you mean --bundle?"),
    (["extract", "--scene", "s", "--out", "o", "--zzzzzz"], "--zzzzzz is not an option of breakscene extract: "
                                                           "see breakscene extract --help"),
])
def test_a_mistyped_flag_is_one_error_with_a_suggestion(capsys, argv, hint):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and hint in err[0], err


def test_unique_prefixes_and_values_after_a_double_dash_are_not_flagged(capsys):
    from commands.options import unknown_flags

    parser = build_parser()
    assert unknown_flags(parser, ["extract", "--phase1-step", "3", "--out", "o"]) is None  # argparse's abbreviation
    assert unknown_flags(parser, ["run", "job.yaml", "--", "--anything"]) is None


def test_every_option_has_help_text_and_one_output_name():
    import argparse

    from commands.options import finish_parser

    parser = finish_parser(build_parser())
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, sub in subs.items():
        for action in sub._actions:
            if action.option_strings:
                assert action.help and action.help != "(default: %(default)s)", (name, action.option_strings)
    for name in ("extract", "generate", "report", "run", "submit"):
        flags = set(subs[name]._option_string_actions)
        assert {"--out", "--output"} <= flags, name


def test_smoke_is_two_plus_two_steps_without_prior_or_grid_and_flags_win():
    from commands.library import config_from_args

    parser = build_parser()
    cfg = config_from_args(parser.parse_args(["extract", "--scene", "s", "--out", "o", "--smoke"]))
    assert (cfg.phase1_steps, cfg.phase2_steps, cfg.grid_seeds, cfg.prior.enabled) == (2, 2, 0, False)
    cfg = config_from_args(parser.parse_args(["extract", "--scene", "s", "--out", "o", "--smoke",
                                              "--phase2-steps", "5", "--prior-preservation"]))
    assert (cfg.phase1_steps, cfg.phase2_steps, cfg.prior.enabled) == (2, 5, True)
