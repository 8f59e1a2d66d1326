"""The pipeline's stages called directly on pandas batches (no Ray)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from breakscene.scenes.masks import decode_rle
from pipeline.records import CONCEPTS_SCHEMA, IMAGES_SCHEMA, TABLES, record_uri, table_rows
from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
from pipeline.tables import staged
from pipeline.config import JobConfig
from commands.jobs import load_job
from pipeline.row import new_row, to_batch
from pipeline.stages import Extract, Segment, load_images, score_and_select
from pipeline.staging import stage_tables
from breakscene.errors import BreakSceneError
from conftest import write_scene


def _row(uri, **kw):
    return new_row(**{"image_uri": str(uri), "image_id": kw.get("image_id"), "mask_uris": kw.get("masks", []),
                        "labels": [], "gt_mask_uris": kw.get("gt", []), "manifest_row": 0})


def _job(tmp_path, **kw):
    return JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl", **kw)


def test_load_records_bad_images_and_hashes_good_ones(tmp_path, examples):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    rows = [_row(examples / "bear" / "img.jpg"), _row(tmp_path / "missing.png"), _row(tmp_path / "corrupt.jpg"),
            _row(tmp_path / "anim.gif", image_id="given")]
    out = load_images(to_batch(rows), {}).to_pylist()
    assert out[0]["status"] == "ok" and (out[0]["width"], out[0]["height"]) == (512, 512)
    assert len(out[0]["image_id"]) == 16 and out[0]["image_bytes"][:2] == b"\xff\xd8"
    assert out[1]["status"] == "failed" and "missing.png does not exist" in out[1]["error"]
    assert out[1]["image_id"].startswith("uri-")
    assert out[2]["status"] == "failed" and "corrupt.jpg cannot be decoded" in out[2]["error"]
    assert out[3]["status"] == "failed" and "unsupported format GIF" in out[3]["error"] and out[3]["image_id"] == "given"
    assert all(r["timings"]["load"] > 0 for r in out)


def test_user_masks_are_scored_and_all_selected(tmp_path):
    scene = write_scene(tmp_path / "s", size=(64, 64), boxes=((5, 5, 30, 30), (35, 35, 60, 60)))
    Image.open(scene / "mask1.png").resize((32, 32), Image.NEAREST).save(scene / "mask1.png")  # wrong size
    job = _job(tmp_path)
    row = _row(scene / "img.png", masks=[str(scene / "mask0.png"), str(scene / "mask1.png")],
               gt=[str(scene / "mask0.png")])
    batch = load_images(to_batch([row]), {})
    batch = Segment(SegmentSettings.from_job(job))(batch)
    out = score_and_select(batch, SelectSettings.from_job(job)).to_pylist()[0]
    assert out["status"] == "ok", out["error"]
    masks = out["masks"]
    assert [m["source"] for m in masks] == ["user", "user"]
    assert [m["mask_uri"] for m in masks] == [str(scene / "mask0.png"), str(scene / "mask1.png")]
    assert decode_rle(masks[0]["rle"]).sum() == 25 * 25
    assert "mask1.png is 32x32 but its image is 64x64: resized" in out["warnings"][0]
    feats = out["features"]
    assert feats[0]["gt_iou"] == 1.0 and feats[1]["gt_iou"] == 0.0
    assert out["selected"] == [0, 1]


def test_empty_user_mask_fails_the_row(tmp_path):
    scene = write_scene(tmp_path / "s")
    Image.fromarray(np.zeros((64, 96), np.uint8)).save(scene / "mask1.png")
    job = _job(tmp_path)
    row = _row(scene / "img.png", masks=[str(scene / "mask0.png"), str(scene / "mask1.png")])
    batch = load_images(to_batch([row]), {})
    out = Segment(SegmentSettings.from_job(job))(batch).to_pylist()[0]
    assert out["status"] == "failed" and "mask1.png is empty" in out["error"] and out["error"].startswith("segment:")


@pytest.mark.parametrize("kind", ["classical", "tiny-sam"])
def test_automatic_segmenters_feed_selection(tmp_path, kind):
    import skimage.data

    buf = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(buf, format="PNG")
    (tmp_path / "coffee.png").write_bytes(buf.getvalue())
    seg = {"kind": kind, "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    job = _job(tmp_path, segmenter=seg)
    batch = Segment(SegmentSettings.from_job(job))(load_images(to_batch([_row(tmp_path / "coffee.png")]), {}))
    out = score_and_select(batch, SelectSettings.from_job(job)).to_pylist()[0]
    masks = out["masks"]
    assert masks and all(m["source"] == kind and m["mask_uri"] is None for m in masks)
    assert all(decode_rle(m["rle"]).shape == (400, 600) for m in masks)
    if kind == "tiny-sam":
        assert all(m["predicted_iou"] is not None for m in masks)
    # either some masks are selected, or the row is skipped with the reason
    assert out["selected"] or (out["status"] == "skipped" and "no mask passes" in out["error"])


def _photos(tmp_path, names=("coffee", "chelsea", "rocket")):
    import skimage.data

    uris = []
    for name in names:
        Image.fromarray(getattr(skimage.data, name)()).save(tmp_path / f"{name}.png")
        uris.append(tmp_path / f"{name}.png")
    return uris


def test_sam_encodes_a_batch_of_images_in_one_forward(tmp_path):
    """image_batch=3: one image-encoder call for three photos, and the same masks as one
    image at a time (a user-masked row in the batch does not reach SAM)."""
    seg = {"kind": "tiny-sam", "points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
           "image_batch": 3}
    job = _job(tmp_path, segmenter=seg)
    scene = write_scene(tmp_path / "s")
    rows = [_row(u) for u in _photos(tmp_path)] + [_row(scene / "img.png", masks=[str(scene / "mask0.png")])]
    stage = Segment(SegmentSettings.from_job(job))
    calls = []
    stage.segmenter.generator.predictor.model.image_encoder.register_forward_hook(
        lambda module, args, out: calls.append(args[0].shape[0]))
    together = stage(load_images(to_batch(rows), {})).to_pylist()
    assert calls == [3]
    alone = [stage(load_images(to_batch([r]), {})).to_pylist()[0] for r in rows[:3]]
    assert calls == [3, 1, 1, 1]
    for a, b in zip(together[:3], alone):
        assert a["status"] == "ok" and a["masks"] == b["masks"] and a["masks"]
    assert together[3]["masks"][0]["source"] == "user"


def test_a_failing_batch_falls_back_to_one_image_at_a_time(tmp_path, monkeypatch):
    job = _job(tmp_path, segmenter={"kind": "classical"})
    stage = Segment(SegmentSettings.from_job(job))
    monkeypatch.setattr(stage.segmenter, "segment_many", lambda images: 1 / 0)
    real = stage.segmenter.__class__.__call__
    monkeypatch.setattr(stage.segmenter.__class__, "__call__",
                        lambda self, image: 1 / 0 if image.shape[1] == 451 else real(self, image))  # chelsea
    out = stage(load_images(to_batch([_row(u) for u in _photos(tmp_path)]), {})).to_pylist()
    assert [r["status"] for r in out] == ["ok", "failed", "ok"]
    assert out[1]["error"].startswith("segment:") and "division by zero" in out[1]["error"]
    assert out[0]["masks"] and out[2]["masks"]


def test_job_file_errors_name_the_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("output: out\nmanifest: m.jsonl\nextract:\n  phase1_step: 3\n")
    with pytest.raises(BreakSceneError, match="extract.phase1_step: Extra inputs are not permitted"):
        load_job(path)
    path.write_text("output: out\nmanifest: m.jsonl\nmodel:\n  runtime:\n    gradient_checkpointing: always\n")
    with pytest.raises(BreakSceneError, match="model.runtime.gradient_checkpointing: Input should be 'auto', 'on'"):
        load_job(path)
    path.write_text("output: out\nmanifest: m.jsonl\nsegmenter:\n  kind: sam\n")
    with pytest.raises(BreakSceneError, match="needs segmenter.checkpoint"):
        load_job(path)
    path.write_text("output: out\n")
    with pytest.raises(BreakSceneError, match="set 'manifest'"):
        load_job(path)
    path.write_text("output: out\nmanifest: m.jsonl\nresources: {extract_gpus: -1}\n")
    with pytest.raises(BreakSceneError, match="resources.extract_gpus"):
        load_job(path)


def test_shipped_job_files_validate():
    from conftest import ROOT

    for path in sorted((ROOT / "jobs").glob("*.yaml")):
        load_job(path)


def test_extract_stage_resumes_done_images_and_force_redoes_them(tmp_path, examples):
    from conftest import quick_config

    scene = examples / "bear"
    job = JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl", model={"id": "tiny"},
                    extract=quick_config(grid_seeds=0))
    row = _row(scene / "img.jpg", image_id="bear", masks=[str(scene / f"mask{i}.png") for i in range(3)])
    batch = score_and_select(Segment(SegmentSettings.from_job(job))(load_images(to_batch([row]), {})), SelectSettings.from_job(job))
    stage = Extract(ExtractSettings.from_job(job), run_id="r1")
    first = stage(batch)
    (row,) = first.to_pylist()
    assert row["status"] == "ok" and row["image_bytes"] == b"" and row["bundle_uri"].endswith("bundles/bear")
    assert [c["mask_index"] for c in row["concepts"]] == [0, 1, 2]
    record = json.loads((tmp_path / "out" / "records" / "bear.json").read_text())
    assert record["image"]["run_id"] == "r1" and len(record["concepts"]) == 3
    assert [c["mask_index"] for c in record["concepts"]] == [0, 1, 2]
    assert list(record["image"]) == IMAGES_SCHEMA.names + ["extract_started_at", "extract_ended_at"]
    assert all(list(c) == CONCEPTS_SCHEMA.names for c in record["concepts"])
    assert all("mask_uri" not in m for m in record["masks"])  # records keep their format
    # what the staging stage stages is the record's rows (plus each mask's file)
    stage_tables(first, str(tmp_path / "out"), "r1")
    staged_rows = {name: staged(str(tmp_path / "out"), "r1", name, schema).to_table().to_pylist()
              for name, schema in TABLES.items()}
    expected = table_rows([record])
    assert staged_rows["concepts"] == expected["concepts"].to_pylist()
    assert [{k: v for k, v in m.items() if k != "mask_uri"} for m in staged_rows["masks"]] == [
        {k: v for k, v in m.items() if k != "mask_uri"} for m in expected["masks"].to_pylist()]
    assert [m["mask_uri"] for m in staged_rows["masks"]] == [str(scene / f"mask{i}.png") for i in range(3)]
    assert staged_rows["images"] == expected["images"].to_pylist()
    again = Extract(ExtractSettings.from_job(job), run_id="r2")(batch).to_pylist()[0]
    assert again["status"] == "resumed" and again["record_uri"] == record_uri(job.output, "bear")
    forced = Extract(ExtractSettings.from_job(job).forced(), run_id="r3")(batch).to_pylist()[0]
    assert forced["status"] == "ok"
    assert json.loads((tmp_path / "out" / "records" / "bear.json").read_text())["image"]["run_id"] == "r3"


def test_sam_checkpoint_is_fetched_once_per_node(tmp_path, isolated_cache):
    import fsspec

    from batchjob.segmenters import local_checkpoint

    local = tmp_path / "sam.pth"
    local.write_bytes(b"weights")
    assert local_checkpoint(str(local)) == local
    with pytest.raises(BreakSceneError, match="does not exist"):
        local_checkpoint(str(tmp_path / "none.pth"))
    fs = fsspec.filesystem("memory")
    fs.pipe("/models/sam.pth", b"remote weights")
    first = local_checkpoint("memory://models/sam.pth")
    fs.rm("/models/sam.pth")  # a second actor on the node must not need the store
    assert local_checkpoint("memory://models/sam.pth") == first and first.read_bytes() == b"remote weights"
