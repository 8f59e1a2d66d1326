import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breakscene.errors import BreakSceneError
from pipeline.manifest import read_manifest
from pipeline.run import split_duplicates


def test_three_formats_read_the_same(tmp_path):
    rows = [{"image_uri": "a.png", "image_id": "a", "mask_uris": ["m0.png", "m1.png"], "labels": ["cat"]},
            {"image_uri": "b.png"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pq.write_table(pa.Table.from_pylist([{**{"image_id": None, "mask_uris": [], "labels": []}, **r} for r in rows]),
                   tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text('image_uri,image_id,mask_uris,labels\na.png,a,"[""m0.png"", ""m1.png""]",cat\n'
                                    "b.png,,,\n")
    read = [read_manifest(str(tmp_path / f"m.{ext}")) for ext in ("jsonl", "parquet", "csv")]
    assert read[0] == read[1] == read[2]
    assert read[0][0]["mask_uris"] == ["m0.png", "m1.png"] and read[0][0]["labels"] == ["cat"]
    assert read[0][1]["image_id"] is None and read[0][1]["manifest_row"] == 1


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ('{"uri": "a.png"}\n', "has no image_uri column"),
    ('{"image_uri": "a.png", "colour": 1}\n', "unknown column(s) colour"),
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


def test_duplicate_ids_are_rejected_after_the_first():
    rows = [{"image_uri": f"{i}.png", "image_id": i_d, "manifest_row": i}
            for i, i_d in enumerate(["a", "b", "a", None, None])]
    keep, rejected = split_duplicates(rows)
    assert [r["manifest_row"] for r in keep] == [0, 1, 3, 4]
    assert len(rejected) == 1 and "duplicate image_id 'a' (first at row 0)" in rejected[0]["error"]
