"""Narrow seams: each actor stage gets the few frozen settings it needs, built once on the
driver; one ``max_concepts``; user masks through the quality gate only when asked."""
import ast
import dataclasses

import pytest
from conftest import ROOT, write_scene
from pydantic import ValidationError

from pipeline.config import JobConfig, SelectionConfig
from pipeline.row import new_row, to_batch
from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
from pipeline.stages import Segment, load_images, score_and_select


def _job(tmp_path, **kw) -> JobConfig:
    return JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl", **kw)


def test_stages_never_see_the_whole_job():
    """No stage module reads or re-validates a JobConfig: the driver hands each its settings."""
    tree = ast.parse((ROOT / "pipeline" / "stages.py").read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert "JobConfig" not in names and "model_validate" not in attrs


def test_settings_are_frozen_and_carry_only_their_part(tmp_path):
    job = _job(tmp_path, segmenter={"kind": "classical", "scale": 123.0}, extract={"max_concepts": 3},
               storage={"timeout_s": 7.5, "retries": 1}, force=True)
    seg, sel, ext = SegmentSettings.from_job(job), SelectSettings.from_job(job), ExtractSettings.from_job(job)
    assert seg.segmenter.scale == 123.0 and sel.max_concepts == 3 and ext.extract.max_concepts == 3
    assert ext.force and ext.output == job.output and sel.storage.timeout_s == 7.5 == seg.storage.timeout_s
    assert [f.name for f in dataclasses.fields(SegmentSettings)] == ["segmenter", "storage"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        sel.max_concepts = 9


def test_one_max_concepts(tmp_path):
    assert "max_concepts" not in SelectionConfig.model_fields
    old = _job(tmp_path, selection={"max_concepts": 2, "min_quality": 0.3})  # a job file from before
    assert old.extract.max_concepts == 2 and old.selection.min_quality == 0.3
    same = _job(tmp_path, selection={"max_concepts": 5}, extract={"max_concepts": 5})
    assert same.extract.max_concepts == 5
    with pytest.raises(ValidationError, match=r"selection.max_concepts \(2\) and extract.max_concepts \(6\) differ"):
        _job(tmp_path, selection={"max_concepts": 2}, extract={"max_concepts": 6})


def _user_row(tmp_path):
    """Two user masks: a good box, and a speck of 2% of the 3% min_area."""
    scene = write_scene(tmp_path / "s", size=(100, 100), boxes=((20, 20, 60, 60), (70, 70, 72, 72)))
    return new_row(image_uri=str(scene / "img.png"), image_id="u", mask_uris=[str(scene / "mask0.png"),
                   str(scene / "mask1.png")], labels=[], gt_mask_uris=[], manifest_row=0)


@pytest.mark.parametrize("filter_user_masks, chosen", [(False, [0, 1]), (True, [0])])
def test_user_masks_pass_the_quality_gate_only_when_asked(tmp_path, filter_user_masks, chosen):
    job = _job(tmp_path, selection={"filter_user_masks": filter_user_masks, "min_area": 0.03})
    batch = Segment(SegmentSettings.from_job(job))(load_images(to_batch([_user_row(tmp_path)]), {}))
    out = score_and_select(batch, SelectSettings.from_job(job)).to_pylist()[0]
    assert out["status"] == "ok", out["error"]
    assert [m["source"] for m in out["masks"]] == ["user", "user"]
    assert out["selected"] == chosen


def test_filtered_user_masks_that_all_fail_skip_the_image(tmp_path):
    job = _job(tmp_path, selection={"filter_user_masks": True, "min_area": 0.5})
    batch = Segment(SegmentSettings.from_job(job))(load_images(to_batch([_user_row(tmp_path)]), {}))
    out = score_and_select(batch, SelectSettings.from_job(job)).to_pylist()[0]
    assert out["status"] == "skipped" and out["error"].startswith("select: ") and out["selected"] == []
