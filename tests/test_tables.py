"""The output tables as Delta Lake tables: one current row per image, history by version,
compaction, readers (DuckDB, pandas); and the lease that lets one run at a time write."""
import json
import time

import duckdb
import pytest

from breakscene.errors import BreakSceneError
from pipeline.records import TABLES, done_ids, read_table, write_tables
from pipeline.tables import SCHEMA_VERSION, compact, open_table, schema_version
from batchjob.lease import Lease, LeaseHeld, lease_uri, read_lease


def _record(image_id, status, n_masks, run_id, error=None):
    return {"image": {"image_id": image_id, "image_uri": f"{image_id}.png", "manifest_row": 0, "width": 64,
                      "height": 64, "status": status, "error": error, "warnings": [], "mask_source": "user",
                      "n_masks": n_masks, "n_concepts": 0, "bundle_uri": "", "run_id": run_id,
                      "meta": json.dumps({"caption": image_id})},
            "masks": [{"image_id": image_id, "mask_index": i, "source": "user",
                       "rle": {"size": [64, 64], "counts": "x"}, "quality": 0.5 + i / 10, "selected": True,
                       "run_id": run_id} for i in range(n_masks)],
            "concepts": []}


def test_a_retried_image_has_one_current_row_and_its_history(tmp_path):
    out = str(tmp_path / "out")
    counts = write_tables(out, [_record("a", "failed", 3, "r1", error="extract: boom"), _record("b", "ok", 2, "r1")],
                            run_id="r1")
    assert counts == {"images": 2, "masks": 5, "concepts": 0}
    # the failed image, retried by a later run with fewer masks; a new image beside it
    counts = write_tables(out, [_record("a", "ok", 1, "r2"), _record("c", "ok", 1, "r2")], run_id="r2")
    assert counts == {"images": 3, "masks": 4, "concepts": 0}
    images = {r["image_id"]: r for r in read_table(out, "images").to_pylist()}
    assert sorted(images) == ["a", "b", "c"] and images["a"]["status"] == "ok" and images["a"]["error"] is None
    masks = sorted((m["image_id"], m["mask_index"], m["run_id"]) for m in read_table(out, "masks").to_pylist())
    assert masks == [("a", 0, "r2"), ("b", 0, "r1"), ("b", 1, "r1"), ("c", 0, "r2")]
    # time travel: the first run's rows are still there at version 0
    first = {r["image_id"]: r for r in read_table(out, "images", version=0).to_pylist()}
    assert first["a"]["status"] == "failed" and first["a"]["error"] == "extract: boom" and "c" not in first
    assert len(read_table(out, "masks", version=0)) == 5
    assert schema_version(out, "images") == SCHEMA_VERSION
    assert open_table(out, "images").metadata().description.endswith(f"schema version {SCHEMA_VERSION}")
    # the done set is one scan of two columns
    assert sorted(done_ids(out).to_pylist()) == ["a", "b", "c"]
    # a retry that fails before segmentation leaves the image no masks at all
    write_tables(out, [_record("b", "failed", 0, "r3", error="load: gone")], run_id="r3")
    assert sorted(m["image_id"] for m in read_table(out, "masks").to_pylist()) == ["a", "c"]
    assert sorted(done_ids(out).to_pylist()) == ["a", "c"]


def test_duckdb_and_pandas_read_the_tables(tmp_path):
    out = str(tmp_path / "out")
    write_tables(out, [_record("a", "ok", 2, "r1"), _record("b", "failed", 0, "r1", error="load: gone")])
    write_tables(out, [_record("b", "ok", 1, "r2")])
    images = open_table(out, "images").to_pyarrow_dataset()  # noqa: F841 - read by DuckDB below
    masks = open_table(out, "masks").to_pyarrow_dataset()  # noqa: F841
    rows = duckdb.sql("SELECT i.image_id, i.status, count(m.mask_index) AS n, max(m.quality) AS q "
                      "FROM images i LEFT JOIN masks m USING (image_id) GROUP BY ALL ORDER BY 1").fetchall()
    assert rows == [("a", "ok", 2, 0.6), ("b", "ok", 1, 0.5)]
    from deltalake import DeltaTable

    df = DeltaTable(str(tmp_path / "out" / "images")).to_pandas()
    assert sorted(df["image_id"]) == ["a", "b"] and df["error"].isna().all()
    assert json.loads(df.set_index("image_id").loc["a", "meta"]) == {"caption": "a"}


def test_compaction_keeps_the_rows_and_vacuum_only_removed_files(tmp_path):
    out = str(tmp_path / "out")
    for n in range(4):  # four nights, four small files
        write_tables(out, [_record(f"i{n}", "ok", 1, f"r{n}")], run_id=f"r{n}")
    write_tables(out, [_record("i0", "ok", 2, "r9")], run_id="r9")  # a replacement: one file marked removed
    before = sorted(r["image_id"] for r in read_table(out, "images").to_pylist())
    files_before = len(open_table(out, "images").file_uris())
    result = compact(out, TABLES, retention_hours=0)
    assert result["images"]["files_removed"] == files_before and result["images"]["files_added"] == 1
    assert result["images"]["files_deleted"] >= files_before  # removed by the merge and by the compaction
    assert sorted(r["image_id"] for r in read_table(out, "images").to_pylist()) == before
    assert len(open_table(out, "images").file_uris()) == 1
    assert len(read_table(out, "masks")) == 5


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    out = str(tmp_path / "out")
    with Lease(out, "run-1"):
        with pytest.raises(LeaseHeld, match=r"in use by run run-1 \(host .*, pid \d+\) until 20"):
            Lease(out, "run-2").acquire()
        assert read_lease(out)["holder"] == "run-1"
    assert read_lease(out) is None  # released
    # a crashed run's lease expires and is taken over: held briefly, then left unrenewed
    # (written as its renewal writes it, from another host so that no pid check applies)
    crashed = {"holder": "crashed", "host": "elsewhere.invalid", "pid": 1, "expires_at": time.time() + 0.2}
    with open(lease_uri(out), "w") as fh:
        fh.write(json.dumps(crashed))
    with pytest.raises(LeaseHeld, match="in use by run crashed"):
        Lease(out, "run-2").acquire()
    time.sleep(0.5)
    with Lease(out, "run-3"):
        assert read_lease(out)["holder"] == "run-3"
    assert issubclass(LeaseHeld, BreakSceneError)
    # a killed driver of this machine (its pid gone) does not block the next run until expiry
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / "_lease.json").write_text(json.dumps({"holder": "killed", "host": socket.gethostname(),
                                                              "pid": int(gone.stdout), "expires_at": time.time() + 600}))
    with Lease(out, "run-4"):
        assert read_lease(out)["holder"] == "run-4"


def test_the_lease_on_an_s3_server_is_a_conditional_create(s3):
    out = f"s3://{s3}/out"
    with Lease(out, "run-1"):
        with pytest.raises(LeaseHeld, match="in use by run run-1"):
            Lease(out, "run-2").acquire()
    assert read_lease(out) is None


@pytest.fixture
def s3():
    import fsspec
    import s3fs

    from breakscene.files.storage import configure
    from pipeline_helpers import free_port, moto_server_process

    with moto_server_process(free_port()) as endpoint:
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}
        configure({"s3": opts})
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(**opts).mkdir("bkt")
        yield "bkt"
        fsspec.config.conf.pop("s3", None)
        s3fs.S3FileSystem.clear_instance_cache()


def test_delta_tables_on_an_s3_server(s3):
    out = f"s3://{s3}/tables"
    write_tables(out, [_record("a", "failed", 1, "r1")], run_id="r1")
    write_tables(out, [_record("a", "ok", 2, "r2"), _record("b", "ok", 1, "r2")], run_id="r2")
    assert sorted((r["image_id"], r["status"]) for r in read_table(out, "images").to_pylist()) == [
        ("a", "ok"), ("b", "ok")]
    assert len(read_table(out, "masks")) == 3 and read_table(out, "images", version=0).num_rows == 1
    assert lease_uri(out) == f"s3://{s3}/tables/_lease.json"
