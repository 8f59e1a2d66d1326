import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakscene.errors import BreakSceneError
from pipeline import shards
from batchjob.manifest import ManifestSpec, plan, read_manifest
from pipeline.shards import ManifestTally, read_shard


def test_three_formats_read_the_same(tmp_path):
    rows = [{"image_uri": "a.png", "image_id": "a", "mask_uris": ["m0.png", "m1.png"], "labels": ["cat"]},
            {"image_uri": "b.png"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist([{**{"image_id": None, "mask_uris": [], "labels": []}, **r} for r in rows]),
                   tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text('image_uri,image_id,mask_uris,labels\na.png,a,"[""m0.png"", ""m1.png""]",cat\n'
                                    "b.png,,,\n")
    read = [read_manifest(str(tmp_path / f"m.{ext}")) for ext in ("jsonl", "parquet", "csv")]
    assert read[0] == read[1] == read[2] and read[0][0]["meta"] is None
    assert read[0][0]["mask_uris"] == ["m0.png", "m1.png"] and read[0][0]["labels"] == ["cat"]
    assert read[0][1]["image_id"] is None and read[0][1]["manifest_row"] == 1


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"uri": "a.png"}\n', "has no image_uri column"),
    ('{"image_uri": ""}\n', "row 0: image_uri is empty"),
    ('{"image_uri": "a.png", "mask_uris": 3}\n', "mask_uris must be a list"),
])
def test_bad_manifests(tmp_path, content, message):
    path = tmp_path / "m.jsonl"
    path.write_text(content)
    with pytest.raises(BreakSceneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_manifest(str(path))


def test_missing_and_unsupported_manifest(tmp_path):
    with pytest.raises(BreakSceneError, match="does not exist"):
        read_manifest(str(tmp_path / "none.jsonl"))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(BreakSceneError, match="unsupported format"):
        read_manifest(str(tmp_path / "m.txt"))


def test_duplicate_ids_are_rejected_after_the_first(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image_uri": f"{i}.png", **({"image_id": i_d} if i_d else {})}) + "\n"
                            for i, i_d in enumerate(["a", "b", "a", None, None])))
    rows, tally = _stream(ManifestSpec(uri=str(path)))
    assert [r["manifest_row"] for r in rows] == [0, 1, 3, 4]
    (rejected,) = tally["messages"]
    assert rejected["manifest_row"] == 2 and "duplicate image_id 'a' (first at row 0)" in rejected["error"]


def test_csv_ids_and_uris_stay_as_written(tmp_path):
    (tmp_path / "m.csv").write_text("image_uri,image_id,width\n0123,007,12\nb.png,1e3,13\n")
    rows = read_manifest(str(tmp_path / "m.csv"))
    assert [(r["image_uri"], r["image_id"]) for r in rows] == [("0123", "007"), ("b.png", "1e3")]
    assert json.loads(rows[0]["meta"]) == {"width": 12}


def _stream(spec, done=None):
    """read_shard over every shard of ``spec``, as Ray Data calls it (without Ray)."""
    tally = ManifestTally()
    shards = plan(spec)
    out = [t for s in shards for t in read_shard({"uri": [s]}, {"uri": spec.uri, "columns": spec.columns},
                                                 done, tally, len(shards) == 1)]
    rows = [r for t in out for r in t.to_pylist()]
    return rows, tally.result()


def test_sharded_folder_with_a_column_mapping_and_extra_columns(tmp_path):
    """An img2dataset-style dataset: Parquet and CSV shards in a folder (plus a marker
    file and a hidden folder), columns named url / key / caption, mapped by the job."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    pq.write_table(pa.table({"url": ["s3://b/0.jpg", "s3://b/1.jpg"], "key": ["000", "001"],
                             "caption": ["a dog", "a cat"], "width": [640, 480]}), folder / "part-0.parquet")
    (folder / "part-1.csv").write_text("url,key,caption,width\ns3://b/2.jpg,002,a cow,320\n,003,no url,1\n")
    (folder / "_SUCCESS").write_text("")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "x.csv").write_text("junk")
    spec = ManifestSpec(uri=str(folder), columns={"image_uri": "url", "image_id": "key"})
    rows, tally = _stream(spec, done=pa.array(["001"]))
    assert [(r["image_id"], r["image_uri"], r["manifest_row"]) for r in rows] == [
        ("000", "s3://b/0.jpg", 0), ("002", "s3://b/2.jpg", 0)]
    assert json.loads(rows[0]["meta"]) == {"caption": "a dog", "width": 640}
    assert json.loads(rows[1]["meta"]) == {"caption": "a cow", "width": 320}
    assert rows[1]["manifest_file"].endswith("part-1.csv") and rows[1]["manifest_label"] == "part-1.csv:0"
    # one row already done, one malformed (named by file and row), the others to do
    assert (tally["rows"], tally["done"], tally["rejected"]) == (4, 1, 1)
    (bad,) = tally["messages"]
    assert bad["manifest_file"].endswith("part-1.csv") and bad["manifest_row"] == 1
    assert "row 1: url is empty" in bad["error"]
    # the same folder as a glob of its shards
    rows_glob, _ = _stream(ManifestSpec(uri=str(folder / "part-*"), columns=spec.columns), done=pa.array(["001"]))
    assert [r["image_id"] for r in rows_glob] == ["000", "002"]


def test_a_bad_row_or_line_fails_alone_and_a_repeated_id_once(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image_uri": "a.png", "image_id": "a"}\nnot json\n\n{"image_uri": "b.png", "mask_uris": 3}\n'
                    '{"image_uri": "c.png", "image_id": "a"}\n{"image_uri": "d.png", "image_id": " "}\n'
                    '{"image_uri": "e.png"}\n')
    rows, tally = _stream(ManifestSpec(uri=str(path)))
    assert [(r["image_uri"], r["manifest_row"]) for r in rows] == [("a.png", 0), ("e.png", 6)]
    assert tally["rows"] == 6 and tally["rejected"] == 4
    errors = {m["manifest_row"]: m["error"] for m in tally["messages"]}
    assert "row 1: not valid JSON" in errors[1] and "row 3: mask_uris must be a list" in errors[3]
    assert "duplicate image_id 'a' (first at row 0)" in errors[4] and "only whitespace" in errors[5]


def test_rejected_rows_beyond_the_messages_kept_are_still_counted(tmp_path, monkeypatch):
    """A shard reports once, at its end: every bad row counted, the first messages kept."""
    monkeypatch.setattr(shards, "MAX_MESSAGES", 3)
    path = tmp_path / "m.jsonl"
    path.write_text("not json\n" * 10 + '{"image_uri": "a.png"}\n')
    rows, tally = _stream(ManifestSpec(uri=str(path)))
    assert [r["image_uri"] for r in rows] == ["a.png"]
    assert (tally["rows"], tally["rejected"], len(tally["messages"])) == (11, 10, 3)
    assert [m["manifest_row"] for m in tally["messages"]] == [0, 1, 2]


def test_plan_stops_before_work(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BreakSceneError, match="holds no .parquet"):
        plan(ManifestSpec(uri=str(tmp_path / "empty")))
    with pytest.raises(BreakSceneError, match="does not exist"):
        plan(ManifestSpec(uri=str(tmp_path / "none-*.csv")))
    (tmp_path / "m.csv").write_text("url,key\na.png,1\n")
    with pytest.raises(BreakSceneError, match="has no image_uri column"):
        plan(ManifestSpec(uri=str(tmp_path / "m.csv")))
    assert plan(ManifestSpec(uri=str(tmp_path / "m.csv"), columns={"image_uri": "url"})) == [str(tmp_path / "m.csv")]
