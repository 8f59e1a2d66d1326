"""Exit status a scheduler can trust (issue 9): the failed share against the job's
max_failed_fraction, and the codes documented in --help. The real run that exits 3 is in
test_pipeline_limits_e2e.py."""
import pytest

from breakscene.errors import BreakSceneError
from commands.jobs import EXIT_TOO_MANY_FAILED, failed_share_message
from commands.jobs import load_job


def _counts(ok=0, failed=0, skipped=0, resumed=0, duplicate=0):
    return {"ok": ok, "failed": failed, "skipped": skipped, "resumed": resumed, "duplicate": duplicate}


def test_any_failure_is_reported_by_default():
    assert failed_share_message(_counts(ok=5), 0.0) is None
    assert failed_share_message(_counts(ok=99, failed=1), 0.0) == \
        "1 of 100 manifest rows failed (0.01 > max_failed_fraction 0)"
    assert failed_share_message(_counts(failed=3), 0.0) == "3 of 3 manifest rows failed (1 > max_failed_fraction 0)"


def test_a_nightly_job_may_allow_some_failures():
    assert failed_share_message(_counts(ok=90, failed=5, resumed=5), 0.05) is None  # exactly the limit
    assert "6 of 100" in failed_share_message(_counts(ok=89, failed=6, resumed=5), 0.05)
    assert failed_share_message(_counts(failed=4), 1.0) is None
    assert failed_share_message(_counts(), 0.0) is None  # nothing to judge


def test_max_failed_fraction_is_validated(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output: out\nmanifest: m.jsonl\nmax_failed_fraction: 0.1\n")
    assert load_job(path).max_failed_fraction == 0.1
    path.write_text("output: out\nmanifest: m.jsonl\nmax_failed_fraction: 1.5\n")
    with pytest.raises(BreakSceneError, match="max_failed_fraction"):
        load_job(path)


@pytest.mark.parametrize("command", ["run", "submit"])
def test_exit_codes_are_in_help(command, capsys):
    from commands.main import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0" in text and "2 bad input" in text and f"{EXIT_TOO_MANY_FAILED} the" in text
