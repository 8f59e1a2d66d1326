import math

import numpy as np
import pytest

from breakscene.quality.score import mask_features, score_masks, select_masks, shape_features, shape_score


def _square(size, y0, x0, side):
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_features_of_a_clean_square():
    m = _square(20, 5, 5, 10)
    f = shape_features(m)
    assert f["area_fraction"] == 0.25 and f["n_components"] == 1
    assert f["largest_component_fraction"] == 1.0 and f["hole_fraction"] == 0.0
    assert f["border_contact"] == 0.0 and f["center_fraction"] == 1.0
    assert 0.7 < f["compactness"] <= 1.0  # a square: pi/4 with an exact perimeter
    assert shape_score(f) == pytest.approx(math.sqrt(f["compactness"]))


def test_holes_components_border_and_overlap():
    m = _square(20, 0, 0, 10)  # touches two borders
    m[4:6, 4:6] = False  # a 4-pixel hole
    m[15:17, 15:17] = True  # a second, small component
    f = shape_features(m, others=[_square(20, 0, 0, 5)])
    assert f["n_components"] == 2
    assert f["largest_component_fraction"] == pytest.approx(96 / 100)
    assert f["hole_fraction"] == pytest.approx(4 / 104)
    # the 76-pixel border ring: 10 on the top row, 9 more down the left column
    assert f["border_contact"] == pytest.approx(19 / 76)
    assert f["max_overlap"] == pytest.approx(24 / 25)  # the 5x5 square, less the hole pixel (4, 4)


def test_old_shape_score_confidence_and_gt_iou():
    m = _square(20, 5, 5, 10)
    f = {**shape_features(m, gt_masks=[_square(20, 5, 5, 5)]), "predicted_iou": 0.5, "stability_score": 0.8}
    assert f["gt_iou"] == pytest.approx(25 / 100)
    assert shape_score(f) == pytest.approx(0.4 * math.sqrt(f["compactness"]))
    assert shape_score({**f, "predicted_iou": 1.5}) == pytest.approx(0.8 * math.sqrt(f["compactness"]))


def test_empty_mask_scores_zero():
    f = mask_features(np.zeros((8, 8), bool), np.zeros((8, 8, 3), np.uint8))
    assert f["quality"] == 0.0 and f["quality_version"] == "quality-v1"


def test_selection_is_greedy_by_quality_without_overlap():
    size = 40
    masks = [_square(size, 10, 10, 10), _square(size, 12, 12, 10), _square(size, 22, 22, 8),
             _square(size, 0, 0, 40), _square(size, 20, 0, 3)]
    feats = [{**shape_features(m), "quality": 0.5} for m in masks]
    feats[1]["quality"] = 1.0  # the overlapping one is better
    chosen, reason = select_masks(feats, masks, max_concepts=4, min_quality=0.1, min_area=0.01,
                                  max_area=0.5, max_overlap=0.1, min_center_fraction=0.0)
    # 3 is too large, 4 is too small (9/1600 < 0.01), 0 overlaps the better 1
    assert chosen == [1, 2] and reason is None
    chosen, reason = select_masks(feats, masks, 4, 1.01, 0.01, 0.5, 0.1)
    assert chosen == [] and "no mask passes" in reason


def test_selection_needs_the_centre_square():
    wide = np.zeros((20, 60), bool)
    wide[5:15, 0:15] = True  # left of the centre square (x 20..40)
    f = {**shape_features(wide), "quality": 1.0}
    assert f["center_fraction"] == 0.0
    assert select_masks([f], [wide], 4, 0.0, 0.0, 1.0, 1.0)[0] == []


# --- image evidence and the predicted-IoU score, on hand-built photographs ---

def _disc(size, cy, cx, r):
    y, x = np.ogrid[:size, :size]
    return (y - cy) ** 2 + (x - cx) ** 2 <= r * r


def _disc_photo(size=128, r=30):
    """A red disc on a grey-green background, both with mild sensor noise."""
    rng = np.random.default_rng(0)
    img = np.empty((size, size, 3), float)
    img[:] = (90, 110, 90)
    disc = _disc(size, size // 2, size // 2, r)
    img[disc] = (200, 60, 50)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), disc


@pytest.fixture(scope="module")
def disc_scores():
    image, disc = _disc_photo()
    half = disc.copy()
    half[:, 64:] = False
    masks = {"exact": disc, "dilated": _disc(128, 64, 64, 40), "shifted": _disc(128, 64, 82, 30), "half": half}
    feats = score_masks(image, list(masks.values()))
    return dict(zip(masks, feats))


def test_the_exact_disc_mask_scores_highest(disc_scores):
    exact = disc_scores["exact"]
    assert exact["quality"] > 0.8
    for name in ("dilated", "shifted", "half"):
        assert exact["quality"] > disc_scores[name]["quality"] + 0.1, name


@pytest.mark.parametrize("term", ["edge_alignment", "edge_strong", "ring_contrast", "ring_histogram", "grabcut_iou",
                                  "colour_iou"])
def test_each_image_term_prefers_the_exact_mask(disc_scores, term):
    for name in ("dilated", "shifted", "half"):
        assert disc_scores["exact"][term] > disc_scores[name][term], name


def test_superpixel_terms_see_a_boundary_through_homogeneous_regions(disc_scores):
    exact = disc_scores["exact"]
    assert exact["superpixel_iou_coarse"] > 0.9 and exact["superpixel_iou_fine"] > 0.9
    for name in ("dilated", "shifted", "half"):  # each cuts through the flat background or the flat disc
        assert disc_scores[name]["superpixel_cut_coarse"] > exact["superpixel_cut_coarse"] + 0.1, name
        assert disc_scores[name]["superpixel_iou_coarse"] < exact["superpixel_iou_coarse"] - 0.1, name


def test_superpixels_of_a_large_photo_run_small_and_cover_the_analysis_image():
    from breakscene.quality.evidence import ANALYSIS_SIDE, SUPERPIXEL_SIDE, image_evidence, mask_evidence

    image, disc = _disc_photo(size=512, r=120)
    ev = image_evidence(image)
    assert ev.shape == (ANALYSIS_SIDE, ANALYSIS_SIDE) and SUPERPIXEL_SIDE < ANALYSIS_SIDE
    for name, labels in ev.superpixels.items():
        assert labels.shape == ev.shape and ev.superpixel_sizes[name].sum() == ANALYSIS_SIDE ** 2
    exact, shifted = mask_evidence(ev, disc), mask_evidence(ev, _disc(512, 256, 330, 120))
    assert exact["superpixel_iou_coarse"] > 0.9 and exact["superpixel_iou_fine"] > 0.9
    assert shifted["superpixel_cut_coarse"] > exact["superpixel_cut_coarse"] + 0.1


def test_opencv_image_operations_match_their_scipy_definitions():
    """The fast paths (OpenCV Lab, Sobel, dilation, distance transform) compute what the
    scikit-image / scipy definitions do."""
    from scipy import ndimage
    from skimage import color, filters

    from breakscene.quality.evidence import EDGE_TOLERANCE, distance_to_outside, image_evidence

    image, disc = _disc_photo()
    ev = image_evidence(image)
    lab = color.rgb2lab(image)
    assert np.abs(ev.lab - lab).max() < 0.5  # Lab units (L 0..100)
    grad = np.sqrt(sum(filters.sobel(ev.lab[..., c]) ** 2 for c in range(3)))
    assert np.allclose(ev.grad, grad / grad.mean(), atol=1e-3)
    assert np.array_equal(ev.grad_max, ndimage.maximum_filter(ev.grad, size=2 * EDGE_TOLERANCE + 1))
    assert ev.lab_scale == pytest.approx(float(np.sqrt(ev.lab.reshape(-1, 3).var(axis=0).sum())), rel=1e-4)
    blob = disc & ~_disc(128, 70, 60, 8)  # a disc with a bite: distances bend around it
    for m in (blob, ~blob):
        assert np.allclose(distance_to_outside(m), ndimage.distance_transform_edt(m), atol=1e-4)


def test_ring_contrast_over_a_uniform_image_is_zero():
    image = np.full((96, 96, 3), 120, np.uint8)
    f = mask_features(_disc(96, 48, 48, 20), image)
    assert f["ring_contrast"] == 0.0 and f["ring_histogram"] == 0.0 and f["texture_contrast"] == 0.0
    assert f["edge_alignment"] == pytest.approx(0.0) and f["edge_strong"] == 0.0 and f["edge_weak"] == 1.0
    assert 0.0 <= f["quality"] <= 1.0


def test_sam_scores_are_blended_where_present_and_optional_otherwise():
    image, disc = _disc_photo()
    alone = mask_features(disc, image)
    with_sam = mask_features(disc, image, predicted_iou=0.2, stability_score=0.5)
    from breakscene.quality.model import blend, load_model

    w = load_model().sam_weight
    assert with_sam["quality"] == pytest.approx((1 - w) * alone["quality"] + w * 0.1)
    assert blend(0.7, None, None) == 0.7 and blend(0.7, float("nan"), None) == 0.7


def test_the_shipped_model_loads_and_is_documented():
    import json
    from importlib import resources

    from breakscene.quality.score import SHAPE_COLUMNS
    from breakscene.quality.evidence import EVIDENCE_COLUMNS
    from breakscene.quality.model import QualityModel, load_model

    model = load_model()
    assert model.version == "quality-v1"
    assert set(model.features) <= set(EVIDENCE_COLUMNS) | set(SHAPE_COLUMNS)
    assert model.info["refit"] == "python -m benchmarks quality --fit"
    assert model.info["fitted_on"]["scenes"] == ["bear", "chicken", "creature", "toys"]
    raw = json.loads(resources.files("breakscene.quality").joinpath("data", "quality_model_v1.json").read_text())
    again = QualityModel.from_dict(raw)
    rows = np.array([[0.9, 0.95, 0.95, 0.0, 1.0], [0.3, 0.4, 0.5, 0.2, 0.7]])[:, :len(model.features)]
    assert np.allclose(again.predict_rows(rows), model.predict_rows(rows))
    assert model.predict_rows(rows)[0] > model.predict_rows(rows)[1]
    with pytest.raises(ValueError, match="entries"):
        QualityModel.from_dict({**raw, "coef": raw["coef"][:-1]})


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "examples"


@pytest.mark.skipif(not (EXAMPLES / "bear" / "img.jpg").is_file(), reason="needs ../shared/examples")
def test_quality_benchmark_runs_tiny():
    import argparse

    from benchmarks.__main__ import bench_quality, table

    args = argparse.Namespace(scenes=str(EXAMPLES), families=["shift", "partial_drop"], severities=[0.0, 1.0],
                              seeds=1, fit=False)
    result = bench_quality(args)
    assert result["scenes"] == ["bear", "chicken", "creature", "toys"] and result["clean_masks"] == 12
    assert result["noisy_masks"] == 36 and "wrote_model" not in result
    loso = result["leave_one_scene_out"]
    assert set(loso["per_family"]) == {"shift", "partial_drop"}
    assert loso["overall"]["new"]["spearman"] > loso["overall"]["old"]["spearman"]
    assert 0 < result["timing"]["seconds_per_mask"] < 5
    scoring = result["timing"]["scoring"]  # the example photos' own masks, with their image's share
    assert scoring["masks_per_image"] == 3 and scoring["image_side_px"] == 512
    assert 0 < scoring["mask_ms"] < scoring["ms_per_mask"]
    assert scoring["ms_per_mask"] == pytest.approx(1000 * result["timing"]["seconds_per_mask"])
    assert "leave_one_scene_out.overall.new.spearman" in table("quality", result)


def test_quality_benchmark_rejects_bad_arguments(capsys):
    import argparse

    from benchmarks.__main__ import bench_quality

    with pytest.raises(SystemExit) as exit_info:
        bench_quality(argparse.Namespace(scenes=".", families=["smudge"], severities=[0.5], seeds=1, fit=False))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: unknown noise family 'smudge'")


def test_report_plots_predicted_against_true_iou_per_family(tmp_path):
    import json

    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from robustness.report import build_report

    rows = []
    for i, (family, iou, predicted) in enumerate([("clean", 1.0, 0.9), ("dilate", 0.8, 0.7), ("dilate", 0.5, 0.4),
                                                  ("dilate", 0.3, 0.35), ("shift", 0.6, 0.2), ("shift", 0.4, 0.5)]):
        rows.append({"cell_id": f"c{i}", "scene_id": "s", "concept_index": 0, "family": family, "severity": 0.5,
                     "seed": 0, "status": "ok", "reason": "", "mask_iou": iou, "predicted_quality": predicted,
                     "attention_iou": iou, "grid_uri": ""})
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pandas(pd.DataFrame(rows)), path)
    summary = build_report(str(path), tmp_path / "report")
    assert (tmp_path / "report" / "figures" / "predicted_quality.png").stat().st_size > 1000
    # with the clean mask: dilate ranks perfectly; shift (1.0, 0.6, 0.4 vs 0.9, 0.2, 0.5) does not
    assert summary["predicted_quality_spearman"] == {"dilate": 1.0, "shift": 0.5}
    html = (tmp_path / "report" / "index.html").read_text()
    assert "predicted mask quality" in html and 'alt="predicted_quality"' in html
    assert json.loads((tmp_path / "report" / "report.json").read_text())["predicted_quality_spearman"]["dilate"] == 1.0


def test_study_rows_carry_predicted_quality_beside_true_iou(tmp_path):
    from robustness.cells import MEASUREMENT_COLUMNS
    from robustness.grid import StudyConfig, build_cells
    from robustness.groundtruth import collect_scenes
    from robustness.workers import StudyWorker

    cfg = StudyConfig(kind="study", output=str(tmp_path), scenes={"generated": 1, "generated_size": 128},
                      noise={"families": ["shift"], "severities": [1.0]}, model={"id": "tiny"},
                      extract={"phase1_steps": 1, "phase2_steps": 1, "grid_seeds": 0, "prior": {"enabled": False}},
                      evaluation={"generation": False})
    from breakscene.scenes.scene import decode_image
    from robustness.groundtruth import load_clean

    worker = StudyWorker(cfg.model_dump(mode="json"))
    scenes = collect_scenes(cfg.scenes)
    cell = next(c for c in build_cells(cfg, scenes) if c["family"] == "shift")
    shifted = worker.run_cell(cell)
    assert shifted["status"] == "ok" and len(shifted["rows"]) == 3
    for r in shifted["rows"]:
        assert 0.0 <= r["predicted_quality"] <= 1.0 and r["quality_version"] == "quality-v1"
        assert r["mask_iou"] < 0.5  # shifted by a whole radius
    # generated scenes: flat objects with exact masks; shifting by a radius must cost predicted quality
    image_bytes, clean = load_clean(scenes[0])
    clean_quality = [f["quality"] for f in score_masks(np.asarray(decode_image(image_bytes, "s")), list(clean))]
    assert np.mean(clean_quality) > np.mean([r["predicted_quality"] for r in shifted["rows"]]) + 0.2
    assert "predicted_quality" in MEASUREMENT_COLUMNS
