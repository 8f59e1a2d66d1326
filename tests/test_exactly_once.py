"""A run's commits as one unit (pipeline/intent.py): the driver is killed (SIGKILL, in a
child process) at every commit boundary, then the next holder of the lease rolls the run
forward; every table ends with exactly one current row per key, and the summary is written."""
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT
from pipeline.intent import commit_run, intent_uri, pending, roll_forward
from pipeline.records import read_table, table_rows, write_tables
from pipeline.tables import STAGING, clear_staging, stage_rows
from breakscene.failpoints import ENV

BOUNDARIES = ["intent-written", "committed-masks", "committed-concepts", "committed-images", "summary-written"]
KEYS = {"images": ("image_id",), "masks": ("image_id", "mask_index"), "concepts": ("image_id", "concept_index")}


def _record(image_id, status, n_masks, run_id, n_concepts=0):
    return {"image": {"image_id": image_id, "image_uri": f"{image_id}.png", "manifest_row": 0, "width": 64,
                      "height": 64, "status": status, "error": None if status == "ok" else "boom",
                      "warnings": [], "mask_source": "user", "n_masks": n_masks, "n_concepts": n_concepts,
                      "bundle_uri": "", "run_id": run_id},
            "masks": [{"image_id": image_id, "mask_index": i, "source": "user", "rle": {"size": [64, 64], "counts": "x"},
                       "quality": 0.5, "selected": True, "run_id": run_id} for i in range(n_masks)],
            "concepts": [{"image_id": image_id, "concept_index": i, "token": f"<asset{i}>", "mask_index": i,
                          "run_id": run_id} for i in range(n_concepts)]}


def _earlier_output(out: str) -> None:
    """A night before: ``a`` done, ``b`` failed (to be retried and replaced by the run)."""
    write_tables(out, [_record("a", "ok", 2, "r0", 2), _record("b", "failed", 3, "r0")], run_id="r0")


def _stage(out: str, run_id: str) -> None:
    """What the workers of run ``run_id`` staged: ``b`` retried (now 2 masks and concepts), ``c`` and ``d`` new."""
    records = [_record("b", "ok", 2, run_id, 2), _record("c", "ok", 3, run_id, 3), _record("d", "ok", 1, run_id, 1)]
    for name, table in table_rows(records).items():
        stage_rows(out, run_id, name, table)


COMMIT = """
import sys
from pipeline.intent import commit_run
out, run_id = sys.argv[1:3]
commit_run(out, run_id, ["images", "masks", "concepts"], {"run_id": run_id, "counts": {"ok": 3}})
"""


def _commit_in_child(out: str, run_id: str, failpoint: str | None) -> int:
    env = {**os.environ, ENV: failpoint or ""}
    return subprocess.run([sys.executable, "-c", COMMIT, out, run_id], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120).returncode


def _one_row_per_key(out: str) -> dict[str, list]:
    rows = {name: read_table(out, name).to_pylist() for name in KEYS}
    for name, keys in KEYS.items():
        dupes = [k for k, n in Counter(tuple(r[k] for k in keys) for r in rows[name]).items() if n > 1]
        assert not dupes, f"{name}: rows twice for {dupes}"
    return rows


def _expected(rows: dict, run_id: str) -> None:
    assert sorted((r["image_id"], r["status"]) for r in rows["images"]) == [("a", "ok"), ("b", "ok"), ("c", "ok"),
                                                                           ("d", "ok")]
    assert sorted((m["image_id"], m["mask_index"]) for m in rows["masks"]) == [
        ("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0), ("c", 1), ("c", 2), ("d", 0)]
    assert len(rows["concepts"]) == 2 + 2 + 3 + 1
    assert {m["run_id"] for m in rows["masks"] if m["image_id"] != "a"} == {run_id}


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_a_driver_killed_at_each_commit_boundary_is_rolled_forward_once(tmp_path, boundary):
    out = str(tmp_path / "out")
    _earlier_output(out)
    _stage(out, "r1")
    assert _commit_in_child(out, "r1", boundary) == -signal.SIGKILL
    assert Path(intent_uri(out, "r1")).is_file()  # killed before the intent was removed

    assert roll_forward(out) == ["r1"]  # what the next run, gc or compact does first, under the lease
    _expected(_one_row_per_key(out), "r1")
    assert pending(out) == [] and not (tmp_path / "out" / STAGING / "r1").exists()
    summary = json.loads((tmp_path / "out" / "runs" / "r1.json").read_text())
    assert summary["tables"] == {"images": 4, "masks": 8, "concepts": 8}
    # a second roll forward, and another run staging nothing, change nothing
    assert roll_forward(out) == []
    _expected(_one_row_per_key(out), "r1")


def test_a_run_killed_before_its_intent_commits_nothing_and_its_staging_is_cleared(tmp_path):
    out = str(tmp_path / "out")
    _earlier_output(out)
    _stage(out, "r1")  # the driver died while the workers were staging
    assert clear_staging(out, keep={i["run_id"] for i in pending(out)}) == 1
    rows = _one_row_per_key(out)
    assert sorted(r["image_id"] for r in rows["images"]) == ["a", "b"]
    # the rerun stages the same images again and commits them once
    _stage(out, "r2")
    commit_run(out, "r2", ["images", "masks", "concepts"], {"run_id": "r2"})
    _expected(_one_row_per_key(out), "r2")


def test_an_unfinished_run_is_finished_by_the_next_run_in_the_same_commit_sequence(tmp_path):
    """Killed after masks; the next run (which staged its own new image) rolls the first forward,
    then commits its own: each row once, both runs' summaries written."""
    out = str(tmp_path / "out")
    _earlier_output(out)
    _stage(out, "r1")
    assert _commit_in_child(out, "r1", "committed-masks") == -signal.SIGKILL
    roll_forward(out)
    write_tables(out, [_record("e", "ok", 1, "r2", 1)], run_id="r2")
    rows = _one_row_per_key(out)
    assert sorted(r["image_id"] for r in rows["images"]) == ["a", "b", "c", "d", "e"]
    assert len(rows["masks"]) == 9
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["r1.json"]


def test_gc_keeps_the_staging_a_pending_intent_needs(tmp_path):
    out = str(tmp_path / "out")
    _earlier_output(out)
    _stage(out, "r1")
    assert _commit_in_child(out, "r1", "committed-concepts") == -signal.SIGKILL
    _stage(out, "dead")  # a run killed before its intent: its staging is garbage
    assert clear_staging(out, keep={i["run_id"] for i in pending(out)}) == 1
    assert (tmp_path / "out" / STAGING / "r1").is_dir()
    roll_forward(out)
    _expected(_one_row_per_key(out), "r1")
