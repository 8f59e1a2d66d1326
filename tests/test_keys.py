"""Image ids never become paths as given: every id gets its own safe storage name, and
nothing outside the output is touched (issue 9)."""
import hashlib
import json
import re

import pytest

from breakscene.files.storage import join
from conftest import quick_config, write_scene
from pipeline.records import bundle_uri, read_records, read_table, record_uri, write_tables
from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
from pipeline.config import JobConfig
from batchjob.keys import id_problem, storage_key
from pipeline.row import new_row, to_batch
from pipeline.stages import Extract, Segment, load_images, score_and_select

HOSTILE = [".", "..", "a/b", "../../x", "y" * 1000, "Cat", "cat", "猫 café/ü", "a\\b", ".hidden", "con", "a--b",
           "x.tmp-1234", "-rf", " padded "]


def test_storage_keys_are_safe_bounded_and_unique_even_ignoring_case():
    keys = [storage_key(i) for i in HOSTILE]
    assert len({k.lower() for k in keys}) == len(HOSTILE)
    for key in keys:
        assert re.fullmatch(r"[a-z0-9][a-z0-9_-]*", key) and len(key) <= 64, key
    # plain names stay readable; all others are a slug plus a hash of the exact id
    assert storage_key("cat") == "cat" and storage_key("bear-small_2") == "bear-small_2"
    assert storage_key("uri-0123456789abcdef") == "uri-0123456789abcdef"
    assert storage_key("Cat") == "cat--" + hashlib.sha256(b"Cat").hexdigest()[:16]
    assert storage_key("..").startswith("id--") and storage_key("../../x").startswith("x--")
    assert storage_key("猫 café/ü").startswith("cafe-u--")
    assert storage_key("y" * 1000) == "y" * 40 + "--" + hashlib.sha256(b"y" * 1000).hexdigest()[:16]
    assert storage_key("con") != "con" and storage_key("a--b") != "a--b"
    assert storage_key("../../x") == storage_key("../../x")  # stable across runs


@pytest.mark.parametrize("out", ["/data/out", "s3://bucket/out"])
def test_record_and_bundle_uris_stay_directly_under_the_output(out):
    for image_id in HOSTILE:
        key = storage_key(image_id)
        assert record_uri(out, image_id) == join(out, "records", key + ".json")
        assert bundle_uri(out, image_id) == join(out, "bundles", key)


def test_ids_refused_with_a_reason():
    assert "only whitespace" in id_problem("   ")
    assert "control character" in id_problem("a\x00b") and "control character" in id_problem("two\nlines")
    for image_id in HOSTILE:
        assert id_problem(image_id) is None, image_id


def test_refused_ids_fail_their_row_alone(tmp_path):
    """As the run reads the manifest (``shards.read_shard``, here without Ray)."""
    from pipeline.shards import ManifestTally, read_shard

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"image_id": i, "image_uri": f"img{n}.png"}) + "\n"
                            for n, i in enumerate(["ok", " ", "a\tb"])))
    tally = ManifestTally()
    rows = [r for t in read_shard({"uri": [str(path)]}, {"uri": str(path)}, None, tally, True) for r in t.to_pylist()]
    assert [r["image_id"] for r in rows] == ["ok"]
    result = tally.result()
    assert result["rejected"] == 2 and [m["manifest_row"] for m in result["messages"]] == [1, 2]
    assert "only whitespace" in result["messages"][0]["error"]
    assert "control character" in result["messages"][1]["error"]


def test_hostile_ids_through_the_real_stages_touch_nothing_outside_the_output(tmp_path):
    """Load, segment (user masks), score and extract (tiny) with ids that are dot names,
    separators, traversal, very long, unicode and differ only in case: each image gets its
    own bundle and record, the tables hold each id once, and the user's files outside the
    output (and the output's own folders) are untouched."""
    work = tmp_path / "work"
    scene = write_scene(tmp_path / "scene", size=(64, 64), boxes=((8, 8, 40, 40),))
    (work / "x").mkdir(parents=True)
    (work / "x" / "notes.txt").write_text("the user's")
    (work / "keep.txt").write_text("the user's too")
    out = work / "out"
    ids = [".", "..", "a/b", "../../x", "y" * 1000, "Cat", "cat", "猫"]
    job = JobConfig(output=str(out), manifest="m.jsonl", model={"id": "tiny"},
                    extract=quick_config(phase1_steps=1, phase2_steps=1, grid_seeds=0,
                                         prior={"enabled": False}))
    rows = [new_row(**{"image_uri": str(scene / "img.png"), "image_id": i, "mask_uris": [str(scene / "mask0.png")],
                         "labels": [], "gt_mask_uris": [], "manifest_row": n}) for n, i in enumerate(ids)]
    batch = score_and_select(Segment(SegmentSettings.from_job(job))(load_images(to_batch(rows), {})), SelectSettings.from_job(job))
    done = Extract(ExtractSettings.from_job(job), run_id="r1")(batch).to_pylist()
    assert [r["status"] for r in done] == ["ok"] * len(ids), [r["error"] for r in done]

    # nothing outside the output changed, nothing new appeared beside it
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt", "out", "x"]
    assert [p.name for p in (work / "x").iterdir()] == ["notes.txt"]
    assert (work / "x" / "notes.txt").read_text() == "the user's" and (work / "keep.txt").read_text() == "the user's too"
    assert sorted(p.name for p in out.iterdir()) == ["bundles", "records"]
    # one bundle and one record per id, each where its key says
    bundles = sorted(p.name for p in (out / "bundles").iterdir())
    assert bundles == sorted(storage_key(i) for i in ids)
    assert all((out / "bundles" / b / "bundle.json").is_file() for b in bundles)
    records = read_records(str(out))
    assert sorted(records) == sorted(ids)
    for image_id, rec in records.items():
        assert rec["image"]["bundle_uri"] == bundle_uri(str(out), image_id)
        assert {c["bundle_uri"] for c in rec["concepts"]} == {rec["image"]["bundle_uri"]}
    counts = write_tables(str(out), list(records.values()))
    assert counts["images"] == len(ids) and counts["concepts"] == len(ids)
    table_ids = read_table(str(out), "images").column("image_id").to_pylist()
    assert sorted(table_ids) == sorted(ids)
    assert json.loads((out / "records" / f"{storage_key('Cat')}.json").read_text())["image"]["image_id"] == "Cat"


def test_study_cell_names_are_hashes_whatever_the_scene_id():
    """The study names its cell files and bundles by ``cell_id``: a hash of the cell's
    settings, so a manifest's scene id never reaches a path there either."""
    from robustness.grid import StudyConfig, cell_id

    cfg = StudyConfig(kind="study", output="o", scenes={"generated": 1})
    for scene_id in HOSTILE:
        assert re.fullmatch(r"[0-9a-f]{16}", cell_id(cfg, scene_id, "erode", 0.5, 0, {}))
