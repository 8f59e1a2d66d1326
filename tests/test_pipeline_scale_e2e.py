"""The pipeline at dataset scale, as users run it: a sharded manifest with its own column
names, score-only runs (no diffusion model), a failed image retried into one current row,
the Delta tables read by DuckDB and pandas, and one run at a time per output."""
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_helpers import run_cli, tables, write_job

pytestmark = pytest.mark.e2e


def _sharded_dataset(folder, examples, late):
    """An img2dataset-style folder: a Parquet shard and a CSV shard, columns url / key /
    masks / caption, and one row whose image does not exist yet."""
    folder.mkdir(parents=True)
    masks = {n: [str(examples / n / f"mask{i}.png") for i in range(3)] for n in ("bear", "chicken", "creature")}
    pq.write_table(pa.table({"url": [str(examples / n / "img.jpg") for n in ("bear", "chicken")],
                             "key": ["bear", "chicken"], "masks": [masks["bear"], masks["chicken"]],
                             "caption": ["a bear", "a chicken"]}), folder / "part-00000.parquet")
    (folder / "part-00001.csv").write_text(
        "url,key,masks,caption\n"
        f"{examples / 'creature' / 'img.jpg'},007,\"{json.dumps(masks['creature']).replace(chr(34), chr(34) * 2)}\","
        "a creature\n"
        f"{late},late,\"[\"\"{examples / 'toys' / 'mask0.png'}\"\"]\",not there yet\n")
    (folder / "_SUCCESS").write_text("")


def test_score_only_sharded_manifest_then_a_retry_leaves_one_current_row(tmp_path, examples):
    late = tmp_path / "late.jpg"
    _sharded_dataset(tmp_path / "dataset", examples, late)
    out = tmp_path / "out"
    manifest = {"uri": str(tmp_path / "dataset"), "columns": {"image_uri": "url", "image_id": "key", "mask_uris": "masks"}}
    job = write_job(tmp_path / "job.yaml", manifest, str(out),
                    # a model that cannot load: score-only must never construct the extractor
                    model={"id": str(tmp_path / "no-such-diffusion-model")}, max_failed_fraction=0.5)
    proc = run_cli("run", str(job), "--stop-after", "score")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "4 manifest rows, 0 already done, 4 to process, 0 rejected (stop after score)" in proc.stdout
    t = tables(str(out))
    images = {r["image_id"]: r for r in t["images"]}
    assert sorted(images) == ["007", "bear", "chicken", "late"]  # the CSV id as written
    assert {i: r["status"] for i, r in images.items()} == {"007": "scored", "bear": "scored", "chicken": "scored",
                                                           "late": "failed"}
    assert "does not exist" in images["late"]["error"] and images["bear"]["error"] is None
    assert json.loads(images["bear"]["meta"]) == {"caption": "a bear"}
    assert json.loads(images["007"]["meta"]) == {"caption": "a creature"}
    assert images["007"]["manifest_file"].endswith("part-00001.csv") and images["007"]["manifest_row"] == 0
    assert all(r["n_concepts"] == 0 and r["bundle_uri"] == "" for r in images.values())
    # every user mask scored, with its quality; no bundles, no records, no concepts table
    assert len(t["masks"]) == 9 and all(0 < m["quality"] <= 1 and m["selected"] for m in t["masks"])
    assert abs(next(m for m in t["masks"] if (m["image_id"], m["mask_index"]) == ("bear", 2))["area_fraction"]
               - 0.290) < 0.002
    assert not (out / "bundles").exists() and not (out / "records").exists() and not (out / "concepts").exists()
    first_run = json.loads((out / "summary.json").read_text())
    assert first_run["counts"]["scored"] == 3 and first_run["counts"]["failed"] == 1
    assert set(first_run["seconds_per_stage"]) == {"load", "segment", "score"}

    # the missing image appears; the next night retries only it
    shutil.copy(examples / "toys" / "img.jpg", late)
    proc = run_cli("run", str(job), "--stop-after", "score")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "4 manifest rows, 3 already done, 1 to process" in proc.stdout
    again = json.loads((out / "summary.json").read_text())
    assert again["counts"]["scored"] == 1 and again["counts"]["resumed"] == 3
    t2 = tables(str(out))
    late_rows = [r for r in t2["images"] if r["image_id"] == "late"]
    assert len(late_rows) == 1 and late_rows[0]["status"] == "scored" and late_rows[0]["run_id"] == again["run_id"]
    assert len(t2["images"]) == 4 and len(t2["masks"]) == 10

    # readers: DuckDB (over the Delta table's Arrow dataset) and pandas; history by version
    import duckdb
    from deltalake import DeltaTable

    images_ds = DeltaTable(str(out / "images")).to_pyarrow_dataset()  # noqa: F841 - read by DuckDB
    masks_ds = DeltaTable(str(out / "masks")).to_pyarrow_dataset()  # noqa: F841
    rows = duckdb.sql("SELECT i.image_id, i.status, count(*) FROM images_ds i JOIN masks_ds m USING (image_id) "
                      "GROUP BY ALL ORDER BY 1").fetchall()
    assert rows == [("007", "scored", 3), ("bear", "scored", 3), ("chicken", "scored", 3), ("late", "scored", 1)]
    df = DeltaTable(str(out / "images")).to_pandas()
    assert df.set_index("image_id").loc["late", "status"] == "scored"
    old = DeltaTable(str(out / "images"), version=0).to_pandas().set_index("image_id")
    assert old.loc["late", "status"] == "failed" and old.loc["late", "run_id"] == first_run["run_id"]

    # compaction keeps the current rows
    proc = run_cli("compact", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(r["image_id"] for r in tables(str(out))["images"]) == ["007", "bear", "chicken", "late"]


def test_a_second_run_on_the_same_output_is_refused(tmp_path, examples):
    from batchjob.lease import Lease
    from batchjob.preflight import claim_output_folder

    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image_uri": str(examples / "bear" / "img.jpg")}) + "\n")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(manifest), str(out))
    claim_output_folder(str(out), "pipeline")  # what the run in progress wrote before its lease
    with Lease(str(out), "nightly-20261126"):  # a run in progress on the same output
        proc = run_cli("run", str(job), timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "in use by run nightly-20261126" in line and "until 20" in line
    assert not (out / "images").exists()
