"""Ctrl-C and SIGTERM during `breakscene extract` (its own process): one line, exit 130 /
143, and nothing left behind: no half-written bundle in the temporary folder, no --out."""
import signal

import pytest

from breakscene.failpoints import ENV
from fault_helpers import Started, error_lines

SLOW = ["--model", "tiny", "--phase1-steps", "400", "--phase2-steps", "400", "--no-prior-preservation",
        "--resolution", "32", "--grid-seeds", "0"]


@pytest.mark.parametrize("signum,moment", [(signal.SIGINT, "training"), (signal.SIGTERM, "bundle-half-written")])
def test_a_stopped_extract_leaves_nothing_behind(tmp_path, examples, signum, moment):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "bundle"
    extra = {ENV: f"{moment}:pause", "TMPDIR": str(tmp)} if moment != "training" else {"TMPDIR": str(tmp)}
    steps = SLOW if moment == "training" else [*SLOW[:2], "--phase1-steps", "1", "--phase2-steps", "1", *SLOW[6:]]
    run = Started(tmp_path / "log", "extract", "--scene", str(examples / "bear"), "--out", str(out), *steps, **extra)
    if moment == "training":  # the model is loaded once the training's temporary folders exist
        ready = lambda started: started.proc.poll() is None and _cpu_seconds(started.proc.pid) > 8  # noqa: E731
    else:
        ready = lambda started: f"failpoint {moment}: paused" in started.stdout()  # noqa: E731
    run.when(ready, lambda: run.proc.send_signal(signum), timeout=240)
    code, _, stderr = run.finish()
    status = 128 + signum
    assert code == status, stderr[-3000:]
    assert error_lines(stderr) == [
        f"error: stopped by {signal.Signals(signum).name}: breakscene extract did not finish; nothing half-written "
        f"is left (exit status {status})"], stderr[-3000:]
    left = [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")]  # torch's compile cache
    assert left == [] and not out.exists()


def _cpu_seconds(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
