import math

import numpy as np
import pytest

from breakscene.quality import mask_features, quality_score, select_masks


def _square(size, y0, x0, side):
    m = np.zeros((size, size), bool)
    m[y0:y0 + side, x0:x0 + side] = True
    return m


def test_features_of_a_clean_square():
    m = _square(20, 5, 5, 10)
    f = mask_features(m)
    assert f["area_fraction"] == 0.25 and f["n_components"] == 1
    assert f["largest_component_fraction"] == 1.0 and f["hole_fraction"] == 0.0
    assert f["border_contact"] == 0.0 and f["center_fraction"] == 1.0
    assert 0.7 < f["compactness"] <= 1.0  # a square: pi/4 with an exact perimeter
    assert f["quality"] == pytest.approx(math.sqrt(f["compactness"]))


def test_holes_components_border_and_overlap():
    m = _square(20, 0, 0, 10)  # touches two borders
    m[4:6, 4:6] = False  # a 4-pixel hole
    m[15:17, 15:17] = True  # a second, small component
    f = mask_features(m, others=[_square(20, 0, 0, 5)])
    assert f["n_components"] == 2
    assert f["largest_component_fraction"] == pytest.approx(96 / 100)
    assert f["hole_fraction"] == pytest.approx(4 / 104)
    # the 76-pixel border ring: 10 on the top row, 9 more down the left column
    assert f["border_contact"] == pytest.approx(19 / 76)
    assert f["max_overlap"] == pytest.approx(24 / 25)  # the 5x5 square, less the hole pixel (4, 4)


def test_confidence_and_gt_iou():
    m = _square(20, 5, 5, 10)
    f = mask_features(m, predicted_iou=0.5, stability_score=0.8, gt_masks=[_square(20, 5, 5, 5)])
    assert f["gt_iou"] == pytest.approx(25 / 100)
    assert f["quality"] == pytest.approx(0.4 * math.sqrt(f["compactness"]))
    assert quality_score({**f, "predicted_iou": 1.5}) == pytest.approx(0.8 * math.sqrt(f["compactness"]))


def test_empty_mask_scores_zero():
    assert mask_features(np.zeros((8, 8), bool))["quality"] == 0.0


def test_selection_is_greedy_by_quality_without_overlap():
    size = 40
    masks = [_square(size, 10, 10, 10), _square(size, 12, 12, 10), _square(size, 22, 22, 8),
             _square(size, 0, 0, 40), _square(size, 20, 0, 3)]
    feats = [mask_features(m) for m in masks]
    assert feats[0]["quality"] < 1.0
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
    f = mask_features(wide)
    assert f["center_fraction"] == 0.0
    assert select_masks([f], [wide], 4, 0.0, 0.0, 1.0, 1.0)[0] == []
