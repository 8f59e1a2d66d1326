"""The options every command shares: --version, --log-level / -v, defaults shown in --help."""
import importlib.metadata
import logging
import re
import subprocess
import sys

import pytest

from breakscene.config import ExtractConfig
from conftest import ROOT
from pipeline.cli import build_parser, main

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
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "--version"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"breakscene {VERSION}"


def test_help_shows_defaults_and_never_none(capsys):
    cfg = ExtractConfig()
    extract = " ".join(_help(capsys, "extract").split())  # argparse wraps lines
    assert f"--phase1-steps PHASE1_STEPS (default: {cfg.phase1_steps})" in extract
    assert f"--lambda-attn LAMBDA_ATTN (default: {cfg.lambda_attn})" in extract
    assert f"--num-class-images NUM_CLASS_IMAGES (default: {cfg.prior.num_class_images})" in extract
    assert "(default: stabilityai/stable-diffusion-2-1-base)" in extract.replace("stable- diffusion", "stable-diffusion")
    generate = " ".join(_help(capsys, "generate").split())
    assert "--seed SEED (default: 0)" in generate  # an option without help text gets one
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
    cmd = [sys.executable, "-m", "pipeline.cli", "--log-level", "debug", "report", str(tmp_path / "x"),
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
    from breakscene.cli_options import finish_parser

    parser = finish_parser(finish_parser(build_parser()))
    assert parser.parse_args(["-v", "report", "x", "--out", "y"]).verbose == 1
