"""`breakscene run` under faults, as an operator meets them: Ctrl-C and SIGTERM, the driver
killed (kill -9) between two table commits, a disk that fills up or is remounted read-only
mid-run. Each ends in one line and a documented exit status, the lease released, and a
rerun that leaves every table with one current row per key."""
import json
import signal
from pathlib import Path

import pytest

from fault_helpers import Started, error_lines, fill, leased, one_row_per_key, remount, small_disk, streaming
from breakscene.failpoints import ENV
from pipeline_helpers import run_cli, write_job

pytestmark = pytest.mark.e2e
SCENES = ("bear", "chicken", "creature", "toys")


def _job(tmp_path: Path, examples: Path, out: Path) -> Path:
    rows = [{"image_uri": str(examples / n / "img.jpg"), "image_id": n,
             "mask_uris": [str(examples / n / f"mask{i}.png") for i in range(3)]} for n in SCENES]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return write_job(tmp_path / "job.yaml", str(manifest), str(out), stop_after="score")


def _scored_once(out: Path) -> None:
    rows = one_row_per_key(str(out))
    assert sorted(r["image_id"] for r in rows["images"]) == sorted(SCENES)
    assert all(r["status"] == "scored" for r in rows["images"]) and len(rows["masks"]) == 12


def test_signals_and_a_kill_between_commits_then_a_rerun(tmp_path, examples):
    out = tmp_path / "out"
    job = _job(tmp_path, examples, out)
    # Ctrl-C while the stages run, SIGTERM while Ray starts: one line, 130 / 143, lease released
    for signum, ready, status in ((signal.SIGINT, streaming, 130), (signal.SIGTERM, leased(out), 143)):
        run = Started(tmp_path / f"run-{status}", "run", str(job))
        run.when(ready, lambda: run.proc.send_signal(signum))
        code, _, stderr = run.finish()
        assert code == status, stderr[-3000:]
        assert error_lines(stderr) == [
            f"error: stopped by {signal.Signals(signum).name}: breakscene run did not finish; nothing half-written is "
            f"left (exit status {status})"], stderr[-3000:]
        assert not (out / "_lease.json").exists()
    # the driver killed (SIGKILL) right after the masks table's commit, before the images table's
    killed = run_cli("run", str(job), **{ENV: "committed-masks"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(list((out / "_commits").glob("*.json"))) == 1
    rerun = run_cli("run", str(job))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "stopped during its commit before; its commits are finished now" in rerun.stdout
    _scored_once(out)
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["counts"]["resumed"] == 4
    assert not (out / "_commits").exists() or not list((out / "_commits").iterdir())


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_an_output_that_stops_taking_writes_stops_the_run_cleanly(tmp_path, examples, fault):
    with small_disk(tmp_path / "disk", "32m") as disk:
        out = disk / "out"
        job = _job(tmp_path, examples, out)
        run = Started(tmp_path / "run", "run", str(job))
        filler = []
        run.when(streaming, lambda: filler.append(fill(disk)) if fault == "full" else remount(disk, "ro"))
        code, _, stderr = run.finish()
        lines = error_lines(stderr)
        assert code == 4, stderr[-3000:]
        assert len(lines) == 1 and lines[0].startswith("error: output ") and "cannot be written" in lines[0], lines
        reason = "No space left on device" if fault == "full" else "Read-only file system"
        assert reason in lines[0] and "nothing of it was committed" in lines[0], lines
        if fault == "full":
            assert not (out / "_lease.json").exists()  # released
            filler[0].unlink()
        else:
            remount(disk, "rw")  # the lease could not be removed: this host's next run takes it over at once
        rerun = run_cli("run", str(job))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        _scored_once(out)
