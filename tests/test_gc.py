"""`breakscene gc OUT`: removes only what this project left half-written."""
from commands.main import main
from batchjob.preflight import claim_output_folder


def test_gc_removes_our_leftovers_and_nothing_of_the_users(tmp_path, capsys):
    bundles = tmp_path / "out" / "bundles"
    done = bundles / "bear"
    done.mkdir(parents=True)
    claim_output_folder(str(tmp_path / "out"), "pipeline")  # as every run's first write does
    (done / "bundle.json").write_text("{}")
    leftover = bundles / ".bear.tmp-1a2b3c4d"  # a killed local commit
    leftover.mkdir()
    (leftover / "grid.png").write_bytes(b"x")
    cut_short = bundles / "toys"  # an upload cut short carries the in-progress marker
    cut_short.mkdir()
    (cut_short / ".breakscene-partial").write_text("")
    (cut_short / "grid.png").write_bytes(b"x")
    users = bundles / "my-notes"  # not ours: no bundle.json, no marker
    users.mkdir()
    (users / "notes.txt").write_text("keep me")

    assert main(["gc", str(tmp_path / "out")]) == 0
    assert (done / "bundle.json").is_file()
    assert not leftover.exists() and not cut_short.exists()
    assert (users / "notes.txt").read_text() == "keep me"
