"""Issue 17: manifests read as written. A bad byte, a bad row, a byte-order mark, a
repeated column or a non-string id column must never drop, shift or silently change rows."""
import datetime as dt
import decimal
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from breakscene.errors import BreakSceneError
from pipeline.shards import DoneSet
from batchjob.keys import id_text, id_texts
from batchjob.manifest import ManifestSpec, plan, read_manifest
from pipeline.shards import ManifestTally, read_shard
from pipeline.row import new_row, to_batch
from pipeline.stages import ContentClaims, load_images


def stream(spec, done=None, tally=None):
    """read_shard over every shard of ``spec``, as Ray Data calls it (without Ray)."""
    tally = tally or ManifestTally()
    shards = plan(spec)
    out = [t for s in shards for t in read_shard({"uri": [s]}, {"uri": spec.uri, "columns": spec.columns},
                                                 done, tally, len(shards) == 1)]
    return [r for t in out for r in t.to_pylist()], tally.result()


# 1. a bad byte or a bad row fails alone, and every row is counted

def test_a_non_utf8_byte_in_a_csv_rejects_only_its_row(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"image_uri,image_id,caption\na.png,a,x\nb\xff.png,b,x\nc.png,c,x\n"
                     b"d.png,d,caf\xe9\ne.png,e,x\nf.png,f,x\n")
    rows, tally = stream(ManifestSpec(uri=str(path)))
    assert [r["image_id"] for r in rows] == ["a", "c", "e", "f"]
    assert [r["manifest_row"] for r in rows] == [0, 2, 4, 5]
    assert (tally["rows"], tally["rejected"]) == (6, 2)
    errors = {m["manifest_row"]: m["error"] for m in tally["messages"]}
    assert f"manifest {path} row 1: image_uri is not valid UTF-8" in errors[1]
    assert "row 3: caption is not valid UTF-8" in errors[3]


def test_a_csv_row_with_too_many_fields_fails_alone_and_later_rows_keep_their_numbers(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('image_uri,image_id\na.png,a\n"multi\nline.png",b\nc.png,c,extra\nd.png,d\n')
    rows, tally = stream(ManifestSpec(uri=str(path)))
    assert [(r["image_id"], r["manifest_row"]) for r in rows] == [("a", 0), ("b", 1), ("d", 3)]
    assert (tally["rows"], tally["rejected"]) == (4, 1)
    (bad,) = tally["messages"]
    assert bad["manifest_row"] == 2 and "row 2: 3 fields where the header has 2" in bad["error"]


def test_many_bad_rows_across_csv_blocks_keep_every_row_number(tmp_path, monkeypatch):
    from batchjob import manifest
    monkeypatch.setattr(manifest, "CSV_BLOCK_BYTES", 256)  # many blocks, bad rows in several
    lines = [f"{i}.png,{i}" + (",x" if i % 7 == 3 else "") for i in range(300)]
    (tmp_path / "m.csv").write_text("image_uri,image_id\n" + "\n".join(lines) + "\n")
    rows, tally = stream(ManifestSpec(uri=str(tmp_path / "m.csv")))
    assert all(r["image_id"] == str(r["manifest_row"]) for r in rows)
    assert len(rows) + tally["rejected"] == tally["rows"] == 300
    assert sorted(m["manifest_row"] for m in tally["messages"]) == [i for i in range(300) if i % 7 == 3]


def test_a_later_block_with_text_in_a_numeric_column_loses_nothing(tmp_path, monkeypatch):
    """Types are read per batch: pyarrow's inference fixes them on the first block, and a
    later "unknown" in a number column failed the rest of the shard."""
    from batchjob import manifest
    monkeypatch.setattr(manifest, "CSV_BLOCK_BYTES", 128)
    widths = [str(i) for i in range(40)] + ["unknown"] + [str(i) for i in range(9)]
    (tmp_path / "m.csv").write_text("image_uri,width\n" + "".join(f"{i}.png,{w}\n" for i, w in enumerate(widths)))
    rows, tally = stream(ManifestSpec(uri=str(tmp_path / "m.csv")))
    assert len(rows) == tally["rows"] == 50 and tally["rejected"] == 0
    assert json.loads(rows[0]["meta"]) == {"width": 0} and {"width": "unknown"} in [json.loads(r["meta"]) for r in rows]


def test_a_non_utf8_line_in_json_lines_fails_alone(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"image_uri": "a.png"}\n{"image_uri": "b\xff.png"}\n{"image_uri": "c.png"}\n')
    rows, tally = stream(ManifestSpec(uri=str(path)))
    assert [r["image_uri"] for r in rows] == ["a.png", "c.png"]  # never a mangled "b\ufffd.png"
    (bad,) = tally["messages"]
    assert bad["manifest_row"] == 1 and "not valid UTF-8" in bad["error"] and tally["rows"] == 3


# 2. a repeated column is refused before any work

def test_a_csv_with_a_repeated_column_is_refused_naming_it(tmp_path):
    (tmp_path / "m.csv").write_text("image_uri,image_id,image_uri\na.png,a,b.png\n")
    with pytest.raises(BreakSceneError, match="has the column image_uri twice"):
        plan(ManifestSpec(uri=str(tmp_path / "m.csv")))
    pq.write_table(pa.table([["a.png"], ["b.png"]], names=["url", "url"]), tmp_path / "m.parquet")
    with pytest.raises(BreakSceneError, match="has the column url twice"):
        plan(ManifestSpec(uri=str(tmp_path / "m.parquet"), columns={"image_uri": "url"}))


def test_a_later_shard_with_a_repeated_column_fails_alone(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text("image_uri,image_id\na.png,a\n")
    (tmp_path / "d" / "b.csv").write_text("image_uri,image_id,image_id\nb.png,b,c\nc.png,d,e\n")
    rows, tally = stream(ManifestSpec(uri=str(tmp_path / "d")))
    assert [r["image_id"] for r in rows] == ["a"]
    assert (tally["rows"], tally["rejected"]) == (3, 2)
    (msg,) = tally["messages"]
    assert "b.csv has the column image_id twice" in msg["error"]


def test_a_json_line_with_a_repeated_key_fails_alone(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image_uri": "a.png", "image_uri": "b.png"}\n{"image_uri": "c.png"}\n')
    rows, tally = stream(ManifestSpec(uri=str(path)))
    assert [r["image_uri"] for r in rows] == ["c.png"]
    assert "row 0: the key image_uri appears twice" in tally["messages"][0]["error"]


# 3. a byte-order mark is read, not taken for data

def test_byte_order_marks_are_read(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "m.csv").write_bytes(bom + b"image_uri,image_id\na.png,a\nb.png,b\n")
    (tmp_path / "m.jsonl").write_bytes(bom + b'{"image_uri": "a.png", "image_id": "a"}\n'
                                             b'{"image_uri": "b.png", "image_id": "b"}\n')
    for name in ("m.csv", "m.jsonl"):
        spec = ManifestSpec(uri=str(tmp_path / name))
        assert plan(spec) == [str(tmp_path / name)]
        rows, tally = stream(spec)
        assert [r["image_id"] for r in rows] == ["a", "b"] and tally["rejected"] == 0, name
        assert [r["image_id"] for r in read_manifest(spec.uri)] == ["a", "b"]


# 4. one rule for ids and URIs from any column type

@pytest.mark.parametrize("value, text", [
    ("007", "007"), (7, "7"), (7.0, "7"), (-0.0, "0"), (7.5, "7.5"), (1e16, "10000000000000000"),
    (decimal.Decimal("7.00"), "7"), (decimal.Decimal("7.50"), "7.5"), (b"s3://b/k.jpg", "s3://b/k.jpg"),
    (dt.datetime(2024, 5, 1, 12, 30), "2024-05-01T12:30:00"), (dt.date(2024, 5, 1), "2024-05-01"),
    (None, None), ("", ""),
])
def test_id_text_rule(value, text):
    assert id_text(value) == text


@pytest.mark.parametrize("value, why", [
    (b"\xff\xfe", "bytes that are not UTF-8"), (float("nan"), "nan"), (True, "true/false"), ([1], "list"),
])
def test_id_text_refuses_what_is_no_id(value, why):
    with pytest.raises(ValueError, match=why):
        id_text(value)


def test_the_arrow_rule_is_the_python_rule():
    arrays = [pa.array([7.0, 7.5, None]), pa.array([1, None, -3], pa.int16()), pa.array(["a", None, ""]),
              pa.array([b"x", None, b"y"], pa.binary()), pa.array([b"\xff", b"k", None], pa.large_binary()),
              pa.array([dt.datetime(2024, 5, 1), None, dt.datetime(2024, 5, 2, 1)], pa.timestamp("ns")),
              pa.array(["a", "b", "a"]).dictionary_encode(), pa.array([float("inf"), 2.0, None])]
    for arr in arrays:
        texts, problems = id_texts(arr)
        assert texts.type == pa.string()
        for i, value in enumerate(arr.to_pylist()):
            try:
                want = id_text(value)
            except ValueError as exc:
                assert texts[i].as_py() is None and str(exc) == problems[i], (arr.type, i)
            else:
                assert texts[i].as_py() == want and i not in problems, (arr.type, i)


def test_float_and_binary_id_columns_in_parquet_are_stored_and_looked_up_alike(tmp_path):
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image_uri": pa.array([b"a.png", b"b.png", b"c.png", b"d.png"], pa.binary()),
                             "image_id": pa.array([7.0, 8.0, None, float("nan")])}), path)
    spec = ManifestSpec(uri=str(path))
    rows, tally = stream(spec)
    assert [(r["image_uri"], r["image_id"]) for r in rows] == [("a.png", "7"), ("b.png", "8"), ("c.png", "")]
    assert "row 3: image_id is nan" in tally["messages"][0]["error"]
    # what the images table would store is what the done set is looked up with
    again, tally = stream(spec, done=DoneSet([r["image_id"] for r in rows if r["image_id"]]))
    assert [r["image_uri"] for r in again] == ["c.png"] and tally["done"] == 2
    # and the done set applies the same rule to what it is given
    assert DoneSet(pa.array([7.0])).contains(pa.array(["7", "7.0"])).tolist() == [True, False]


@pytest.mark.e2e
def test_float_ids_are_done_on_the_second_score_only_run(tmp_path, examples):
    from pipeline_helpers import run_cli, write_job

    names = ("bear", "chicken")
    pq.write_table(pa.table({"image_uri": [str(examples / n / "img.jpg") for n in names],
                             "image_id": [7.0, 8.0],
                             "mask_uris": [[str(examples / n / f"mask{i}.png") for i in range(3)] for n in names]}),
                   tmp_path / "m.parquet")
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", str(tmp_path / "m.parquet"), str(out), stop_after="score",
                    resources={"num_cpus": 1})
    for attempt in (1, 2):
        proc = run_cli("run", str(job))
        assert proc.returncode == 0, proc.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        if attempt == 1:
            assert summary["counts"]["scored"] == 2
    assert summary["counts"]["resumed"] == 2 and summary["counts"].get("scored", 0) == 0
    assert "2 already done, 0 to process" in proc.stdout
    from pipeline.records import read_table

    assert sorted(read_table(str(out), "images").column("image_id").to_pylist()) == ["7", "8"]


# 5. many rows of one picture cost about what reading them costs

class CountingClaims(ContentClaims):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def claim(self, ids, labels):
        self.calls += 1
        return super().claim(ids, labels)


def test_a_batch_of_duplicate_pictures_claims_once(tmp_path, examples):
    copies = []
    for i in range(6):  # the same content under six names
        copies.append(tmp_path / f"copy{i}.jpg")
        copies[-1].write_bytes((examples / "bear" / "img.jpg").read_bytes())
    rows = [{**new_row(**{"image_uri": str(p), "image_id": None, "mask_uris": [], "labels": [],
                            "gt_mask_uris": [], "manifest_row": i}), "manifest_label": str(i)}
            for i, p in enumerate(copies)]
    claims = CountingClaims()
    out = load_images(to_batch(rows), {}, claims).to_pylist()
    assert claims.calls == 1
    assert [r["status"] for r in out] == ["ok"] + ["duplicate"] * 5
    assert len({r["image_id"] for r in out}) == 1
    assert all("same image content as manifest row 0" in r["error"] for r in out[1:])
    assert all(r["image_bytes"] == b"" for r in out[1:])
    # a second batch of the same content: all duplicates of the first batch's row, one call
    out = load_images(to_batch(rows[:3]), {}, claims).to_pylist()
    assert claims.calls == 2 and [r["status"] for r in out] == ["ok", "duplicate", "duplicate"]


def test_rows_of_one_uri_without_ids_are_duplicates_before_any_fetch(tmp_path):
    uri = str(tmp_path / "never-fetched.png")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image_uri": u, **({"image_id": i} if i else {})}) + "\n"
                            for u, i in [(uri, None), ("b.png", None), (uri, None), (uri, "given"), (uri, None)]))
    rows, counts = stream(ManifestSpec(uri=str(path)))
    assert [(r["manifest_row"], r["image_id"]) for r in rows] == [(0, ""), (1, ""), (3, "given")]
    assert (counts["rows"], counts["duplicate"], counts["rejected"]) == (5, 2, 0)
    assert [(d["manifest_row"], d["note"]) for d in counts["duplicates"]] == [
        (2, "same image_uri as manifest row 0: fetched and processed once"),
        (4, "same image_uri as manifest row 0: fetched and processed once")]


def test_load_leaves_rows_that_are_not_ok_untouched(tmp_path):
    row = {**new_row(**{"image_uri": str(tmp_path / "none.png"), "image_id": None, "mask_uris": [], "labels": [],
                          "gt_mask_uris": [], "manifest_row": 0}), "status": "duplicate", "error": "same"}
    (out,) = load_images(to_batch([row]), {}).to_pylist()
    assert (out["status"], out["error"], out["image_id"]) == ("duplicate", "same", "")
