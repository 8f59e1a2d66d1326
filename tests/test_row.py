"""One typed pipeline row (pipeline/row.py): one Arrow schema with nested columns, declared
once, carried through the stages without JSON text; the status names as one enum; the
photograph fetched once and decoded at most once per stage; each user mask's file in the
masks table (schema version 3, older tables still read, appended to and merged); and every
worker entry applying the job's storage settings, timeouts and retries included."""
import ast
import json
import time

import numpy as np
import pyarrow as pa
import pytest
from deltalake import write_deltalake

from breakscene.files import storage
from conftest import ROOT, write_scene
from net_helpers import silent_server
from batchjob import manifest
from pipeline.shards import ManifestTally, read_shard
from pipeline.config import SegmentSettings, SelectSettings
from pipeline.records import (DONE_STATUSES, IMAGES_SCHEMA, MASKS_SCHEMA, SCORED, TABLES, done_ids, read_table, record_uri, table_rows, write_record, write_tables)
from pipeline import stages
from pipeline.stages import (ScoreAndSelect, Segment, decode_image, load_images, mask_entries, read_bytes, score_and_select)
from pipeline.staging import SUMMARY_SCHEMA, Tally, finish_scored, stage_tables
from pipeline.tables import commit, schema_version, stage_rows, staged, table_uri
from pipeline.config import JobConfig
from pipeline.row import ROW_SCHEMA, new_row, to_batch
from pipeline.records import Status


def _job(tmp_path, **kw):
    return JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl", **kw)


def test_the_row_schema_is_declared_once_with_nested_columns(tmp_path):
    rle = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])
    mask = ROW_SCHEMA.field("masks").type.value_type
    assert mask.field("rle").type == rle and mask.field("mask_uri").type == pa.string()
    assert mask.field("predicted_iou").type == pa.float64()
    for name in ("mask_uris", "labels", "gt_mask_uris", "warnings"):
        assert ROW_SCHEMA.field(name).type == pa.list_(pa.string()), name
    assert ROW_SCHEMA.field("selected").type == pa.list_(pa.int32())
    assert ROW_SCHEMA.field("timings").type == pa.struct([(s, pa.float64()) for s in ("load", "segment", "score",
                                                                                       "extract")])
    features = ROW_SCHEMA.field("features").type.value_type
    assert features.field("quality").type == pa.float64() and features.field("n_components").type == pa.int32()
    assert "record" not in ROW_SCHEMA.names and not hasattr(manifest, "STAGE_SCHEMA")
    # the manifest stage yields that schema, and its rows carry lists, not JSON
    (tmp_path / "m.jsonl").write_text(json.dumps({"image_uri": "a.png", "mask_uris": ["m0.png"], "labels": ["cat"],
                                                  "caption": "x"}) + "\n")
    (table,) = read_shard({"uri": [str(tmp_path / "m.jsonl")]}, {"uri": str(tmp_path / "m.jsonl")}, None,
                             ManifestTally(), True)
    assert table.schema == ROW_SCHEMA
    (row,) = table.to_pylist()
    assert row["mask_uris"] == ["m0.png"] and row["labels"] == ["cat"] and row["warnings"] == []
    assert row["status"] == Status.OK and row["error"] is None and json.loads(row["meta"]) == {"caption": "x"}
    with pytest.raises(TypeError, match="not row columns: record"):
        new_row(image_uri="a.png", record="{}")


def _calls(path):
    tree = ast.parse(path.read_text())
    return {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}


def test_no_stage_parses_or_writes_its_row_as_json_and_no_status_is_a_bare_literal():
    pipeline = ROOT / "pipeline"
    for name in ("stages.py", "staging.py", "shards.py", "row.py"):
        calls = _calls(pipeline / name)
        assert not {c for c in calls if c.startswith("json.") or c.endswith("to_json")}, name
    statuses = {s.value for s in Status}
    for name in ("stages.py", "staging.py", "records.py", "row.py"):
        tree = ast.parse((pipeline / name).read_text())
        for node in [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Status"]:
            tree.body.remove(node)  # the enum's own definition (records.py) names each status once
        literals = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in statuses]
        assert not literals, f"{name}: {literals}"
    assert Tally.STATUSES == ("ok", "failed", "skipped", "resumed", "duplicate", "scored")
    assert DONE_STATUSES == ("ok", "skipped") and SCORED == "scored"


def _scene_rows(tmp_path):
    scene = write_scene(tmp_path / "s", size=(64, 64), boxes=((5, 5, 30, 30), (35, 35, 60, 60)))
    masks = [str(scene / "mask0.png"), str(scene / "mask1.png")]
    return [new_row(image_uri=str(scene / "img.png"), image_id="a", manifest_row=0, mask_uris=masks,
                    labels=["red", "green"], gt_mask_uris=[masks[0]]),
            new_row(image_uri=str(tmp_path / "missing.png"), image_id="b", manifest_row=1),
            new_row(image_uri=str(scene / "img.png"), image_id="c", manifest_row=2, status=Status.DUPLICATE,
                    error="same image content as manifest row 0")]


def test_a_row_goes_through_the_stages_typed_and_stages_its_tables(tmp_path):
    """load -> segment (user masks) -> score -> score-only finish -> staged Parquet."""
    job = _job(tmp_path)
    rows = _scene_rows(tmp_path)
    batch = score_and_select(Segment(SegmentSettings.from_job(job))(load_images(to_batch(rows))), SelectSettings.from_job(job))
    assert batch.schema == ROW_SCHEMA
    a, b, c = batch.to_pylist()
    assert a["status"] == "ok" and (a["width"], a["height"]) == (64, 64) and a["image_bytes"][:4] == b"\x89PNG"
    assert [m["mask_uri"] for m in a["masks"]] == rows[0]["mask_uris"] and a["masks"][0]["source"] == "user"
    assert a["masks"][0]["rle"]["size"] == [64, 64] and a["selected"] == [0, 1]
    assert a["features"][0]["gt_iou"] == 1.0 and a["features"][1]["gt_iou"] == 0.0
    assert 0 <= a["features"][0]["quality"] <= 1 and set(a["timings"]) == {"load", "segment", "score", "extract"}
    assert a["timings"]["score"] > 0 and a["timings"]["extract"] is None
    assert b["status"] == "failed" and b["error"].startswith("load: ") and b["masks"] == []
    assert c["status"] == "duplicate" and c["image_bytes"] == b""
    finished = finish_scored(batch)
    assert finished.column("status").to_pylist() == ["scored", "failed", "duplicate"]
    assert set(finished.column("image_bytes").to_pylist()) == {b""}
    out = str(tmp_path / "out")
    summary = stage_tables(finished, out, "r1")
    assert summary.schema == SUMMARY_SCHEMA
    assert summary.column("status").to_pylist() == ["scored", "failed", "duplicate"]
    assert summary.column("error").to_pylist()[0] is None and summary.column("seconds_load").to_pylist()[0] > 0
    staged_tables = {name: staged(out, "r1", name, schema).to_table() for name, schema in TABLES.items()
                     if name != "concepts"}
    images = {r["image_id"]: r for r in staged_tables["images"].to_pylist()}
    assert sorted(images) == ["a", "b"]  # the duplicate adds no row
    assert images["a"]["status"] == "scored" and images["a"]["error"] is None and images["a"]["n_masks"] == 2
    assert images["a"]["seconds_score"] == a["timings"]["score"] and images["b"]["error"] == b["error"]
    masks = sorted(staged_tables["masks"].to_pylist(), key=lambda m: m["mask_index"])
    assert [m["mask_uri"] for m in masks] == rows[0]["mask_uris"] and [m["selected"] for m in masks] == [True, True]
    assert masks[0]["quality"] == a["features"][0]["quality"] and masks[0]["rle"] == a["masks"][0]["rle"]


def test_a_segmenters_masks_have_no_mask_uri_and_non_finite_scores_are_null(tmp_path):
    scene = write_scene(tmp_path / "s", size=(64, 64))
    row = load_images(to_batch([new_row(image_uri=str(scene / "img.png"), image_id="a")])).to_pylist()[0]
    row["masks"] = mask_entries([{"mask": np.ones((64, 64), bool), "source": "sam", "predicted_iou": float("nan"),
                                    "stability_score": 0.5}])
    (mask,) = to_batch([row]).to_pylist()[0]["masks"]
    assert mask["mask_uri"] is None and mask["predicted_iou"] is None and mask["stability_score"] == 0.5


def test_the_photo_is_fetched_once_and_decoded_at_most_once_per_stage(tmp_path, monkeypatch):
    scene = write_scene(tmp_path / "s", size=(64, 64), boxes=((5, 5, 30, 30), (35, 35, 60, 60)))
    job = _job(tmp_path, segmenter={"kind": "classical"})
    fetched, decoded = [], []
    real_read, real_decode = read_bytes, decode_image
    monkeypatch.setattr(stages, "read_bytes", lambda uri: fetched.append(uri) or real_read(uri))
    monkeypatch.setattr(stages, "decode_image", lambda *a, **k: decoded.append(a[1]) or real_decode(*a, **k))
    rows = [new_row(image_uri=str(scene / "img.png"), image_id=i, manifest_row=n) for n, i in enumerate("ab")]
    batch = load_images(to_batch(rows))
    assert fetched == [str(scene / "img.png")] and len(decoded) == 2  # one fetch for the URI; a check per row
    batch = Segment(SegmentSettings.from_job(job))(batch)
    assert len(decoded) == 4
    batch = score_and_select(batch, SelectSettings.from_job(job))
    assert len(decoded) == 6 and fetched == [str(scene / "img.png")]
    assert all(r["masks"] for r in batch.to_pylist())


def _old_schema(schema: pa.Schema) -> pa.Schema:
    """A table's schema as version 2 wrote it (no masks.mask_uri, no version 4 group columns),
    with its version on the key."""
    for later in ("mask_uri", "group", "label"):
        if later in schema.names:
            schema = schema.remove(schema.get_field_index(later))
    i = schema.get_field_index("image_id")
    return schema.set(i, schema.field(i).with_metadata({"breakscene.schema_version": "2"}))


def _record(image_id, n_masks, run_id, mask_uri=None):
    return {"image": {"image_id": image_id, "image_uri": f"{image_id}.png", "manifest_row": 0, "width": 64,
                      "height": 64, "status": "ok", "error": None, "warnings": [], "mask_source": "user",
                      "n_masks": n_masks, "n_concepts": 0, "bundle_uri": "", "run_id": run_id},
            "masks": [{"image_id": image_id, "mask_index": i, "source": "user", "rle": {"size": [64, 64], "counts": "x"},
                       "quality": 0.5, "selected": True, "run_id": run_id,
                       **({"mask_uri": f"{mask_uri}{i}.png"} if mask_uri else {})} for i in range(n_masks)],
            "concepts": []}


def test_version_2_tables_are_read_appended_to_and_merged(tmp_path):
    out = str(tmp_path / "out")
    old = table_rows([_record("a", 2, "r0"), _record("b", 1, "r0")])
    for name, table in old.items():
        schema = _old_schema(TABLES[name])
        write_deltalake(table_uri(out, name), table.select(schema.names).cast(schema), mode="append", name=name,
                        description=f"breakscene {name} table, schema version 2")
    assert "mask_uri" not in read_table(out, "masks").column_names and schema_version(out, "masks") == 2
    assert sorted(done_ids(out).to_pylist()) == ["a", "b"]
    # a new image (an append) and a retried one (a merge), each mask with its file
    write_tables(out, [_record("c", 1, "r1", mask_uri="c/m")], run_id="r1")
    write_tables(out, [_record("a", 1, "r2", mask_uri="a/m")], run_id="r2")
    masks = {(m["image_id"], m["mask_index"]): m for m in read_table(out, "masks").to_pylist()}
    assert sorted(masks) == [("a", 0), ("b", 0), ("c", 0)]
    assert masks["a", 0]["mask_uri"] == "a/m0.png" and masks["a", 0]["run_id"] == "r2"
    assert masks["b", 0]["mask_uri"] is None and masks["c", 0]["mask_uri"] == "c/m0.png"
    assert len(read_table(out, "masks", version=0)) == 3  # the version 2 rows, as written
    # a run staged before the upgrade (no mask_uri in its Parquet) is still committed
    stage_rows(out, "r3", "masks", old["masks"].select(_old_schema(MASKS_SCHEMA).names))
    commit(out, "masks", MASKS_SCHEMA, staged(out, "r3", "masks", MASKS_SCHEMA), run_id="r3",
             replace_ids={"a", "b"})
    masks = {(m["image_id"], m["mask_index"]): m for m in read_table(out, "masks").to_pylist()}
    assert sorted(masks) == [("a", 0), ("a", 1), ("b", 0), ("c", 0)] and masks["a", 0]["mask_uri"] is None


def test_a_manifest_shard_on_a_silent_server_fails_after_the_jobs_timeout():
    storage.configure(None, timeout_s=30, retries=2)  # what the worker process happened to get first
    tally = ManifestTally()
    with silent_server() as url:
        start = time.perf_counter()
        tables = list(read_shard({"uri": [f"{url}/m.jsonl"]}, {"uri": f"{url}/m.jsonl"}, None, tally, True,
                                    storage={"timeout_s": 0.5, "retries": 0}))
        elapsed = time.perf_counter() - start
    assert tables == [] and elapsed < 5
    (message,) = tally.result()["messages"]
    assert "cannot be read from row 0" in message["error"]


def test_every_worker_entry_applies_the_jobs_storage_settings(tmp_path):
    settings = {"options": {}, "timeout_s": 1.5, "retries": 4}
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image_uri": "a.png"}) + "\n")
    entries = {
        "read_shard": lambda: list(read_shard({"uri": [str(path)]}, {"uri": str(path)}, None, ManifestTally(),
                                                 True, storage=settings)),
        "load_images": lambda: load_images(to_batch([]), settings),
        "stage_tables": lambda: stage_tables(to_batch([]), str(tmp_path / "out"), "r1", storage=settings),
        "Segment": lambda: Segment(SegmentSettings.from_job(_job(tmp_path, storage=settings))),
        "ScoreAndSelect": lambda: ScoreAndSelect(SelectSettings.from_job(_job(tmp_path, storage=settings))),
    }
    for name, call in entries.items():
        storage.reset_io_settings()
        call()
        assert storage.io_settings() == (1.5, 4), name
    # settings left out: the job's defaults, not what the process had before
    storage.configure(None, timeout_s=99, retries=9)
    load_images(to_batch([]), {"options": {}})
    assert storage.io_settings() == (JobConfig(output="o", manifest="m").storage.timeout_s, 2)


def test_a_row_resumed_from_an_earlier_attempts_record_stages_that_record(tmp_path):
    """A record written, the driver killed before its commit: the next run's extract stage
    finds the record and the staging stage stages the record's own rows."""
    out = str(tmp_path / "out")
    record = _record("a", 2, "r0")
    write_record(out, record)
    row = new_row(image_uri="a.png", image_id="a", status=Status.RESUMED, record_uri=record_uri(out, "a"))
    done = new_row(image_uri="b.png", image_id="b", status=Status.RESUMED)  # done in the tables: no rows
    summary = stage_tables(to_batch([row, done]), out, "r1")
    assert summary.column("status").to_pylist() == ["resumed", "resumed"]
    images = staged(out, "r1", "images", IMAGES_SCHEMA).to_table().to_pylist()
    assert [(i["image_id"], i["run_id"], i["status"]) for i in images] == [("a", "r0", "ok")]
    assert len(staged(out, "r1", "masks", MASKS_SCHEMA).to_table()) == 2
