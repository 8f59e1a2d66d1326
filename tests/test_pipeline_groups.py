"""Concept groups in the pipeline (issue 20): manifest rows with a ``group`` learned
together on one extract actor. The stages are called directly here (no Ray); the run on
the embedded Ray and on the S3 server is in tests/test_pipeline_groups_e2e.py."""
import json

import pytest
from conftest import quick_config, write_scene

from batchjob.manifest import ManifestSpec, manifest_fields
from pipeline.config import ExtractSettings, JobConfig, SegmentSettings, SelectSettings
from pipeline.groups import ExtractGroup, group_bundle_uri, group_record_uri
from pipeline.records import CONCEPTS_SCHEMA, read_record, record_uri
from pipeline.row import new_row, to_batch
from pipeline.stages import Segment, load_images, score_and_select

SPEC = ManifestSpec(uri="m.jsonl")


def _fields(**raw):
    return manifest_fields({"image_uri": "a.png", **raw}, SPEC, "m.jsonl", 0, "0")


@pytest.mark.parametrize("raw, message", [
    ({"group": "g"}, "group 'g' needs mask_uris"),
    ({"group": "g", "mask_uris": ["m0.png", "m1.png"], "labels": ["dog"]}, "needs one labels entry per mask_uris "
                                                                            "entry (1 for 2)"),
    ({"group": "g", "mask_uris": ["m0.png", "m1.png"], "labels": ["dog", " dog "]}, "names one object twice"),
    ({"group": "g", "mask_uris": ["m0.png"], "labels": [" "]}, "labels of a grouped row may not be empty"),
    ({"group": "g\x07", "mask_uris": ["m0.png"], "labels": ["dog"]}, "group 'g\\x07' holds control character"),
])
def test_a_bad_grouped_row_is_refused_naming_the_problem(raw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("\\x", "\\\\x")):
        _fields(**raw)


def test_group_values_are_read_as_ids_are():
    assert _fields()["group"] is None and _fields(group="")["group"] is None and _fields(group="  ")["group"] is None
    row = _fields(group=7, mask_uris="m0.png|m1.png", labels='["dog", " ball"]')
    assert row["group"] == "7" and row["labels"] == ["dog", "ball"]  # Parquet's 7 is the group "7"


def test_a_runaway_group_is_capped_before_any_picture_is_fetched():
    from pipeline.groups import cap_group

    rows = [new_row(image_uri=f"s3://b/{n}.jpg", image_id=i, manifest_row=n, group="products",
                    mask_uris=["m.png"], labels=["x"]) for n, i in enumerate(["c", None, "a", "b"])]
    out = {r["image_uri"]: r for r in cap_group(to_batch(rows), max_images=2).to_pylist()}
    assert [out[f"s3://b/{n}.jpg"]["status"] for n in range(4)] == ["skipped", "skipped", "ok", "ok"]
    assert "group 'products' has 4 images, more than groups.max_images=2" in out["s3://b/0.jpg"]["error"]
    assert out["s3://b/1.jpg"]["image_id"].startswith("uri-")  # an id-less row skipped here gets the URI's id
    assert cap_group(to_batch(rows), max_images=4).to_pylist() == to_batch(rows).to_pylist()


# --- the group extract stage ------------------------------------------------------------

SHAPES = {"red": (200, 40, 40), "green": (40, 200, 40)}


def _scene(folder, boxes):
    """A generated scene showing the same two objects (a red and a green box) at new places."""
    return write_scene(folder, size=(64, 64), boxes=boxes)


def _job(tmp_path, **groups):
    return JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl", model={"id": "tiny"},
                     extract=quick_config(grid_seeds=0, resolution=64, prior={"enabled": False}), groups=groups)


def _rows(tmp_path, job, names, group="g", labels=("red", "green")):
    rows = []
    boxes = {"a": ((4, 4, 30, 30), (34, 34, 60, 60)), "b": ((30, 6, 58, 30), (6, 34, 30, 58)),
             "c": ((10, 30, 34, 58), (36, 4, 60, 28)), "d": ((4, 20, 28, 44), (36, 20, 60, 44))}
    for n, name in enumerate(names):
        scene = _scene(tmp_path / name, boxes[name])
        masks = [str(scene / f"mask{i}.png") for i in range(len(labels))]
        if name == "c":  # a mask file that does not exist: this image fails alone
            masks[1] = str(scene / "missing.png")
        rows.append(new_row(image_uri=str(scene / "img.png"), image_id=name, manifest_row=n, mask_uris=masks,
                            labels=list(labels), group=group))
    batch = load_images(to_batch(rows), {})
    batch = Segment(SegmentSettings.from_job(job))(batch)
    return score_and_select(batch, SelectSettings.from_job(job))


def test_a_group_is_learned_together_resumed_and_learned_again_when_it_grows(tmp_path):
    job = _job(tmp_path)
    stage = ExtractGroup(ExtractSettings.from_job(job), run_id="r1")
    out = {r["image_id"]: r for r in stage(_rows(tmp_path, job, "abc")).to_pylist()}
    assert out["c"]["status"] == "failed" and "missing.png" in out["c"]["error"]  # fails alone
    bundle = group_bundle_uri(job.output, "g")
    assert bundle.endswith("/bundles/group.g")
    for name in "ab":
        row = out[name]
        assert row["status"] == "ok", row["error"]
        assert row["bundle_uri"] == bundle and row["image_bytes"] == b""
        # one token per label, shared by both images; each concept row is this image's own mask
        assert [(c["token"], c["label"], c["mask_index"], c["group"]) for c in row["concepts"]] == [
            ("<asset0>", "red", 0, "g"), ("<asset1>", "green", 1, "g")]
        assert all(0 <= c["attention_iou"] <= 1 for c in row["concepts"])
        record = read_record(record_uri(job.output, name))
        assert record["image"]["group"] == "g" and all(list(c) == CONCEPTS_SCHEMA.names for c in record["concepts"])
    info = json.loads((tmp_path / "out" / "bundles" / "group.g" / "bundle.json").read_text())
    assert [s["name"] for s in info["group"]["images"]] == [out["a"]["image_uri"], out["b"]["image_uri"]]
    group_record = read_record(group_record_uri(job.output, "g"))
    assert [m["image_id"] for m in group_record["members"]] == ["a", "b"] and group_record["run_id"] == "r1"
    first_bundle = (tmp_path / "out" / "bundles" / "group.g" / "bundle.json").read_bytes()

    # the same rows again (a run killed before its table commit): resumed from their records
    again = {r["image_id"]: r for r in ExtractGroup(ExtractSettings.from_job(job), run_id="r2")(
        _rows(tmp_path, job, "ab")).to_pylist()}
    assert {k: (r["status"], r["record_uri"]) for k, r in again.items()} == {
        k: ("resumed", record_uri(job.output, k)) for k in "ab"}

    # retrain_on_growth false: a new image is skipped, the bundle stays
    keep = _job(tmp_path, retrain_on_growth=False)
    (kept,) = ExtractGroup(ExtractSettings.from_job(keep), run_id="r3")(_rows(tmp_path, keep, "d")).to_pylist()
    assert kept["status"] == "skipped" and "retrain_on_growth is false" in kept["error"]
    assert (tmp_path / "out" / "bundles" / "group.g" / "bundle.json").read_bytes() == first_bundle

    # a later night brings d alone: the group is learned again from a, b (rebuilt) and d
    grown = {r["image_id"]: r for r in ExtractGroup(ExtractSettings.from_job(job), run_id="r4")(
        _rows(tmp_path, job, "d")).to_pylist()}
    assert sorted(grown) == ["a", "b", "d"] and {r["status"] for r in grown.values()} == {"ok"}
    assert all(r["bundle_uri"] == bundle and len(r["concepts"]) == 2 for r in grown.values())
    assert grown["a"]["masks"] == out["a"]["masks"] and grown["a"]["selected"] == [0, 1]
    info = json.loads((tmp_path / "out" / "bundles" / "group.g" / "bundle.json").read_text())
    assert len(info["group"]["images"]) == 3
    assert [m["image_id"] for m in read_record(group_record_uri(job.output, "g"))["members"]] == ["a", "b", "d"]
    assert read_record(record_uri(job.output, "a"))["image"]["run_id"] == "r4"


def test_a_large_group_is_capped_and_a_small_remainder_fails_with_the_reason(tmp_path):
    job = _job(tmp_path, max_images=1)
    out = {r["image_id"]: r for r in ExtractGroup(ExtractSettings.from_job(job), run_id="r1")(
        _rows(tmp_path, job, "ba")).to_pylist()}
    assert out["a"]["status"] == "ok"  # the smallest id is learned
    assert out["b"]["status"] == "skipped" and "more than groups.max_images=1" in out["b"]["error"]
    strict = _job(tmp_path, min_images=2)
    out = {r["image_id"]: r for r in ExtractGroup(ExtractSettings.from_job(strict), run_id="r2")(
        _rows(tmp_path, strict, "ac", group="h")).to_pylist()}
    assert out["c"]["status"] == "failed" and "missing.png" in out["c"]["error"]
    assert out["a"]["status"] == "failed" and "1 of its 1 images can be learned, fewer than groups.min_images=2" \
        in out["a"]["error"]
    assert read_record(group_record_uri(strict.output, "h")) is None


KILLED = """
import sys
sys.path.insert(0, "tests")
from pathlib import Path
import test_pipeline_groups as t
from pipeline.config import ExtractSettings
from pipeline.groups import ExtractGroup
tmp = Path(sys.argv[1])
job = t._job(tmp)
ExtractGroup(ExtractSettings.from_job(job), run_id="killed")(t._rows(tmp, job, "ab"))
"""


@pytest.mark.e2e
# (a bundle killed half-written is the single image's case: tests/test_interrupts.py)
@pytest.mark.parametrize("point", ["group-bundle-written", "group-images-recorded"])
def test_a_group_killed_at_each_boundary_is_learned_once_by_the_rerun(tmp_path, point):
    import os
    import subprocess
    import sys

    from breakscene.failpoints import ENV
    from conftest import ROOT

    child = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path)], cwd=ROOT, env={**os.environ, ENV: point},
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == -9, child.stderr[-2000:]  # killed there, like kill -9
    assert read_record(group_record_uri(str(tmp_path / "out"), "g")) is None  # not committed
    job = _job(tmp_path)
    rows = {r["image_id"]: r for r in ExtractGroup(ExtractSettings.from_job(job), run_id="rerun")(
        _rows(tmp_path, job, "ab")).to_pylist()}
    # learned again by the rerun, once: one bundle (no leftovers beside it), every record the rerun's
    assert {k: r["status"] for k, r in rows.items()} == {"a": "ok", "b": "ok"}
    assert sorted(p.name for p in (tmp_path / "out" / "bundles").iterdir()) == ["group.g"]
    assert read_record(group_record_uri(job.output, "g"))["run_id"] == "rerun"
    assert {read_record(record_uri(job.output, k))["image"]["run_id"] for k in "ab"} == {"rerun"}
