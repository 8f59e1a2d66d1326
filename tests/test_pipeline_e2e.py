"""The pipeline as users run it: `breakscene run` on a local Ray, reruns, a killed driver."""
import json
import os
import signal
import subprocess
import time

import pytest

from pipeline_helpers import mixed_manifest, no_partial_output, run_cli, tables, write_job, env, VENV_BIN
from conftest import ROOT

pytestmark = pytest.mark.e2e


def _by_id(rows):
    return {r["image_id"]: r for r in rows}


def test_run_writes_tables_and_rerun_resumes(tmp_path, examples):
    manifest, expected = mixed_manifest(tmp_path / "in", examples)
    out = tmp_path / "out"
    # 4 of the 10 rows are bad on purpose: allowed, so the run exits 0
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out), max_failed_fraction=0.5)
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = tables(str(out))
    images = t["images"]
    # 10 manifest rows: 9 images processed once each; the repeated id is rejected in the
    # summary, named by its row (it is not an image of its own)
    assert len(images) == 9 and len({r["image_id"] for r in images}) == 9
    summary = json.loads((out / "summary.json").read_text())
    (dup,) = [e for e in summary["errors"] if "duplicate image_id 'toys'" in e["error"]]
    assert dup["manifest_row"] == 9 and "(first at row 3)" in dup["error"]
    by_id = {r["image_id"]: r for r in images}
    assert all(r["error"] is None for r in images if r["status"] != "failed")
    assert {m["run_id"] for m in t["masks"]} == {summary["run_id"]}
    for image_id, status in expected.items():
        assert by_id[image_id]["status"] == status, (image_id, by_id[image_id]["error"])
    assert "missing.jpg does not exist" in by_id["missing"]["error"]
    assert "unsupported format" in by_id["corrupt"]["error"] or "cannot be decoded" in by_id["corrupt"]["error"]
    assert "unsupported format GIF" in by_id["gif"]["error"]
    assert any("resized" in w for w in by_id["bear-small-mask"]["warnings"])
    assert by_id["coffee"]["status"] in ("ok", "skipped") and by_id["coffee"]["mask_source"] == "classical"
    # masks: every mask of every segmented image, with features; user masks all selected
    masks = t["masks"]
    bear_masks = [m for m in masks if m["image_id"] == "bear"]
    assert len(bear_masks) == 3 and all(m["selected"] and m["source"] == "user" for m in bear_masks)
    assert abs(bear_masks[2]["area_fraction"] - 0.290) < 0.002
    # concepts: one per selected mask of each ok image, with bundle and grid
    concepts = t["concepts"]
    assert sum(c["image_id"] == "bear" for c in concepts) == 3
    ok_ids = {i for i, r in by_id.items() if r["status"] == "ok"}
    assert {c["image_id"] for c in concepts} == ok_ids
    for c in concepts:
        assert os.path.isfile(os.path.join(c["bundle_uri"], "bundle.json"))
        assert os.path.isfile(c["grid_uri"]) and 0 <= c["attention_iou"] <= 1
    assert [c["init_word"] for c in concepts if c["image_id"] == "bear"] == ["bear", None, None]
    assert summary["counts"]["ok"] == len(ok_ids) and summary["counts"]["failed"] == 4
    assert set(summary["seconds_per_stage"]) == {"load", "segment", "score", "extract"}
    assert summary["images_per_hour"] > 0

    # rerun: done images are not touched, failed ones are retried, nothing is duplicated
    bundle_mtime = os.path.getmtime(out / "bundles" / "bear" / "bundle.json")
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["ok"] == 0
    # done images (and the repeated id, whose image is done) are left out before any work
    assert again["counts"]["resumed"] == len(ok_ids) + (by_id["coffee"]["status"] == "skipped") + 1
    assert again["counts"]["failed"] == 3  # retried, failed again
    t2 = tables(str(out))
    assert len(t2["images"]) == 9 and len(t2["concepts"]) == len(concepts)
    # each failed image has one current row (this run's), the first attempt in the history
    current = {r["image_id"]: r for r in t2["images"]}
    assert {i for i, r in current.items() if r["run_id"] == again["run_id"]} == {"missing", "corrupt", "gif"}
    from pipeline.records import read_table

    first = {r["image_id"]: r["run_id"] for r in read_table(str(out), "images", version=0).to_pylist()}
    assert first["missing"] == summary["run_id"]
    assert os.path.getmtime(out / "bundles" / "bear" / "bundle.json") == bundle_mtime

    assert no_partial_output(out)


def test_killed_driver_then_rerun_does_each_image_once(tmp_path, examples):
    rows = [{"image_uri": str(examples / n / "img.jpg"), "image_id": n,
             "mask_uris": [str(examples / n / f"mask{i}.png") for i in range(3)]}
            for n in ("bear", "chicken", "creature", "toys")]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    extract = {"max_concepts": 4, "phase1_steps": 40, "phase2_steps": 40, "phase2_mode": "lora",
               "prior": {"enabled": False}, "grid_seeds": 1, "grid_inference_steps": 2}
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out), extract=extract)
    proc = subprocess.Popen([os.path.join(VENV_BIN, "breakscene"), "run", str(job)], cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    records = out / "records"
    while time.time() < deadline:
        done = [p for p in records.glob("*.json")] if records.exists() else []
        if sum(json.loads(p.read_text())["image"]["status"] == "ok" for p in done) >= 1:
            break
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)
    else:
        pytest.fail("no image finished in time")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-extraction
    proc.wait()
    finished_before = {p.stem for p in records.glob("*.json")}
    assert len(finished_before) < 4

    rerun = run_cli("run", str(job))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["resumed"] >= 1
    t = tables(str(out))
    processed = [r["image_id"] for r in t["images"]]
    assert sorted(processed) == ["bear", "chicken", "creature", "toys"]
    assert all(r["status"] == "ok" for r in t["images"])
    per_image = {}
    for c in t["concepts"]:
        per_image.setdefault(c["image_id"], set()).add(c["concept_index"])
    assert all(per_image[i] == {0, 1, 2} for i in processed) and len(t["concepts"]) == 12
    assert no_partial_output(out)


def test_the_same_picture_twice_without_ids_is_extracted_once(tmp_path, examples):
    """Two extraction actors, and two manifest rows of one picture (one by another path):
    both get the same content id; the later row is reported as a duplicate, not run."""
    import shutil

    copy = tmp_path / "copy-of-creature.jpg"
    shutil.copy(examples / "creature" / "img.jpg", copy)
    masks = {n: [str(examples / n / f"mask{i}.png") for i in range(3)] for n in ("creature", "toys")}
    rows = [{"image_uri": str(examples / "creature" / "img.jpg"), "mask_uris": masks["creature"]},
            {"image_uri": str(examples / "toys" / "img.jpg"), "mask_uris": masks["toys"]},
            {"image_uri": str(copy), "mask_uris": masks["creature"]}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out),
                    resources={"num_cpus": 2, "num_gpus": 2, "extract_actors": 2, "extract_gpus": 1})
    proc = run_cli("run", str(job))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["ok"] == 2 and summary["counts"]["duplicate"] == 1
    (dup,) = summary["duplicates"]
    assert dup["manifest_row"] in (0, 2) and "same image content as manifest row" in dup["note"]
    t = tables(str(out))
    assert len(t["images"]) == 2 and len({r["image_id"] for r in t["images"]}) == 2
    assert len(list((out / "bundles").iterdir())) == 2 and len(t["concepts"]) == 6
