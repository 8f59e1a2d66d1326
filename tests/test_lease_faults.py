"""The output's lease under races and damage: six processes racing for one output, a lease
of the wrong shape, a stalled run taken over, a full disk at the lease's creation."""
import json
import multiprocessing
import os
import time

import pytest

from breakscene.errors import OutputWriteError
from fault_helpers import fill, small_disk
from batchjob.lease import Lease, LeaseHeld, lease_uri, read_lease

RACERS = 6
TRIALS = 40


def _race(out: str, name: str, barrier, won) -> None:
    barrier.wait()
    try:
        Lease(out, name).acquire()
    except LeaseHeld:
        os._exit(0)
    won.put(name)
    time.sleep(0.3)  # held (and alive) while the others try; never released
    os._exit(0)


@pytest.mark.parametrize("start", ["absent", "expired"])
def test_six_racing_processes_never_hold_the_lease_together(tmp_path, start):
    ctx = multiprocessing.get_context("fork")
    for trial in range(TRIALS):
        out = str(tmp_path / f"out{trial}")
        if start == "expired":  # a crashed run's lease: every racer tries to take it over
            os.makedirs(out)
            with open(lease_uri(out), "w") as fh:
                json.dump({"holder": "crashed", "host": "elsewhere", "pid": 1, "expires_at": time.time() - 5}, fh)
        barrier, won = ctx.Barrier(RACERS), ctx.Queue()
        procs = [ctx.Process(target=_race, args=(out, f"r{i}", barrier, won)) for i in range(RACERS)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        winners = []
        while not won.empty():
            winners.append(won.get())
        assert len(winners) == 1, f"trial {trial}: {winners} all hold the lease"
        assert read_lease(out)["holder"] == winners[0]


@pytest.mark.parametrize("body", ["[1, 2]", '{"holder": 5, "expires_at": "soon"}', '"text"', "", "{\"holder\": \"x\"}"])
def test_a_lease_of_the_wrong_shape_is_held_until_it_ages_then_taken_over(tmp_path, body):
    out = tmp_path / "out"
    out.mkdir()
    (out / "_lease.json").write_text(body)
    with pytest.raises(LeaseHeld, match="in use by run an unreadable lease"):
        Lease(str(out), "run-1", ttl_s=60).acquire()
    old = time.time() - 120
    os.utime(out / "_lease.json", (old, old))  # left by a run long gone
    with Lease(str(out), "run-1", ttl_s=60):
        assert read_lease(str(out))["holder"] == "run-1"
    assert not (out / "_lease.json").exists()


def test_a_stalled_run_taken_over_neither_renews_nor_releases_the_new_lease(tmp_path):
    out = str(tmp_path / "out")
    stalled = Lease(out, "stalled", ttl_s=60)
    stalled.acquire()
    newcomer = {"holder": "newcomer", "host": "elsewhere", "pid": 1, "expires_at": time.time() + 600}
    with open(lease_uri(out), "w") as fh:  # what a takeover after the stalled run's expiry leaves
        json.dump(newcomer, fh)
    with pytest.raises(LeaseHeld, match="taken over by newcomer"):
        stalled.renew()
    stalled.release()
    assert read_lease(out) == newcomer


def test_a_full_disk_at_the_lease_leaves_no_lease_and_one_error(tmp_path, capsys):
    from commands.main import main

    with small_disk(tmp_path / "disk", "1m") as disk:
        out = disk / "out"
        out.mkdir()
        fill(disk)
        with pytest.raises(OSError, match="No space left"):
            Lease(str(out), "run-1").acquire()
        assert not (out / "_lease.json").exists()
        job = tmp_path / "job.yaml"
        manifest = tmp_path / "manifest.jsonl"
        manifest.write_text('{"image_uri": "x.png"}\n')
        job.write_text(f"manifest: {manifest}\noutput: {out}\nmodel: {{id: tiny}}\nsegmenter: {{kind: classical}}\n")
        code = main(["run", str(job)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code in (2, OutputWriteError.exit_status) and len(err) == 1, err
        assert err[0].startswith("error: output ") and "No space left on device" in err[0], err
        assert not (out / "_lease.json").exists()
