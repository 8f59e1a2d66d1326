"""Issue 17: what a user should hear about their inputs. Extra frames dropped, pictures too
small to learn from, and masks whose tokens would fight over one region."""
import io

import numpy as np
import pytest
from PIL import Image

from breakscene.scenes.masks import overlapping_pairs
from breakscene.errors import SceneError
from breakscene.scenes.scene import MIN_IMAGE_SIDE, build_scene, decode_image, load_mask_image, load_scene, mask_from_image
from conftest import write_scene


def frames(path, fmt, n=3, size=(32, 32), colours=None):
    images = [Image.new("RGB", size, c) for c in (colours or [(60 * i, 90, 200) for i in range(n)])]
    images[0].save(path, fmt, save_all=True, append_images=images[1:])
    return path


@pytest.mark.parametrize("fmt, name", [("TIFF", "img.tif"), ("WEBP", "img.webp"), ("PNG", "img.png")])
def test_a_picture_of_several_frames_says_the_first_is_used(tmp_path, fmt, name):
    data = frames(tmp_path / name, fmt).read_bytes()
    warnings = []
    rgb = decode_image(data, name, warnings)
    assert warnings == [f"image {name} has 3 frames: the first is used"]
    assert np.abs(np.asarray(rgb)[0, 0].astype(int) - (0, 90, 200)).max() <= 4  # the first frame (WebP is lossy)


def test_a_phone_photo_with_a_second_picture_is_no_news(tmp_path):
    """MPO (phones' JPEG with a depth map or preview): frame 1 is the photo by definition."""
    data = frames(tmp_path / "img.jpg", "MPO", n=2).read_bytes()
    warnings = []
    decode_image(data, "img.jpg", warnings)
    assert warnings == []


def test_a_mask_of_several_frames_says_so(tmp_path):
    white = [(255, 255, 255), (0, 0, 0)]
    path = frames(tmp_path / "mask.tif", "TIFF", colours=white)
    warnings = []
    mask = mask_from_image(load_mask_image(str(path)), str(path), (32, 32), warnings)
    assert mask.all() and warnings == [f"mask {path} has 2 frames: the first is used"]


@pytest.mark.parametrize("size", [(1, 1), (15, 200), (200, 15)])
def test_an_image_too_small_to_learn_from_is_refused(tmp_path, size):
    Image.new("RGB", size, (200, 30, 30)).save(tmp_path / "tiny.png")
    with pytest.raises(SceneError, match=rf"image tiny.png is {size[0]}x{size[1]} pixels: smaller than "
                                         rf"{MIN_IMAGE_SIDE} px on a side"):
        decode_image((tmp_path / "tiny.png").read_bytes(), "tiny.png")
    Image.new("L", size, 255).save(tmp_path / "mask0.png")
    with pytest.raises(SceneError, match="smaller than"):  # what `breakscene extract` reads
        load_scene(str(tmp_path / "tiny.png"), [str(tmp_path / "mask0.png")])


def test_extract_refuses_a_tiny_image_with_one_error_line(tmp_path, capsys):
    from commands.main import main

    Image.new("RGB", (8, 8)).save(tmp_path / "tiny.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask0.png")
    code = main(["extract", "--image", str(tmp_path / "tiny.png"), "--mask", str(tmp_path / "mask0.png"),
                 "--out", str(tmp_path / "out"), "--model", "tiny", "--no-prior-preservation"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "tiny.png is 8x8 pixels: smaller than 16 px on a side" in lines[0]
    assert not (tmp_path / "out").exists()


def test_the_smallest_image_accepted(tmp_path):
    Image.new("RGB", (MIN_IMAGE_SIDE, 300)).save(tmp_path / "ok.png")
    assert decode_image((tmp_path / "ok.png").read_bytes(), "ok.png").size == (MIN_IMAGE_SIDE, 300)


def test_a_tiny_image_fails_its_pipeline_row_alone(tmp_path, examples):
    from pipeline.row import new_row, to_batch
    from pipeline.stages import load_images

    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    rows = [new_row(**{"image_uri": str(p), "image_id": i, "mask_uris": [], "labels": [], "gt_mask_uris": [],
                         "manifest_row": n})
            for n, (p, i) in enumerate([(tmp_path / "dot.png", "dot"), (examples / "bear" / "img.jpg", "bear")])]
    out = load_images(to_batch(rows), {}).to_pylist()
    assert out[0]["status"] == "failed" and "dot.png is 1x1 pixels: smaller than" in out[0]["error"]
    assert out[1]["status"] == "ok"


def _box(shape, x0, y0, x1, y1):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_overlapping_pairs_by_hand():
    shape = (40, 40)
    big = _box(shape, 0, 0, 20, 20)  # 400 px
    inside = _box(shape, 5, 5, 15, 15)  # 100 px, all inside big
    same = _box(shape, 0, 0, 20, 19)  # 380 px of big: IoU 0.95
    apart = _box(shape, 25, 25, 35, 35)
    edge = _box(shape, 18, 0, 38, 20)  # 40 px shared with big: IoU 40/760
    found = {(o.smaller, o.larger): o for o in overlapping_pairs([big, inside, same, apart, edge])}
    assert set(found) == {(1, 0), (2, 0), (1, 2)}
    assert found[(1, 0)].contained == 1.0 and found[(1, 0)].iou == pytest.approx(100 / 400)
    assert found[(2, 0)].iou == pytest.approx(0.95) and found[(2, 0)].contained == 1.0
    assert overlapping_pairs([big, apart, edge]) == []


def test_masks_that_fight_over_one_region_are_named_in_the_scene(tmp_path):
    scene = write_scene(tmp_path / "s", size=(64, 64), boxes=((4, 4, 40, 40), (10, 10, 30, 30), (44, 44, 60, 60)))
    names = [str(scene / f"mask{i}.png") for i in range(3)]
    built = load_scene(str(scene / "img.png"), names)
    (note,) = built.warnings
    assert f"mask {names[1]} lies inside mask {names[0]} (100% of its pixels; IoU 0.31)" in note
    same = build_scene((scene / "img.png").read_bytes(), "img.png",
                       [("a", _box((64, 64), 4, 4, 40, 40)), ("b", _box((64, 64), 4, 4, 40, 39))], 4)
    assert same.warnings == ["masks a and b are nearly the same region (IoU 0.97): their tokens will compete "
                             "for it; give each concept its own region"]


def test_the_pipeline_row_names_fighting_user_masks(tmp_path):
    from pipeline.config import JobConfig
    from pipeline.row import new_row, to_batch
    from pipeline.config import SegmentSettings, SelectSettings
    from pipeline.stages import Segment, load_images, score_and_select

    scene = write_scene(tmp_path / "s", size=(64, 64), boxes=((4, 4, 40, 40), (10, 10, 30, 30)))
    job = JobConfig(output=str(tmp_path / "out"), manifest="m.jsonl")
    masks = [str(scene / "mask0.png"), str(scene / "mask1.png")]
    row = new_row(**{"image_uri": str(scene / "img.png"), "image_id": "s", "mask_uris": masks, "labels": [],
                       "gt_mask_uris": [], "manifest_row": 0})
    out = score_and_select(Segment(SegmentSettings.from_job(job))(load_images(to_batch([row]), {})), SelectSettings.from_job(job)).to_pylist()[0]
    assert out["status"] == "ok"
    assert any(f"mask {masks[1]} lies inside mask {masks[0]}" in w for w in out["warnings"])
