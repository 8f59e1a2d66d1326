import numpy as np
import pytest

from breakscene.scenes.masks import iou
from breakscene.scenes.noise import FAMILIES, boundary_f_score, match_masks, perturb


def _disc(size=128, cy=64, cx=50, r=30):
    yy, xx = np.mgrid[:size, :size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


NEIGHBOUR = np.zeros((128, 128), bool)
NEIGHBOUR[40:90, 85:120] = True


@pytest.mark.parametrize("family", list(FAMILIES))
def test_severity_zero_is_clean_and_noise_is_seeded(family):
    m = _disc()
    assert np.array_equal(perturb(m, family, 0.0, 0, [NEIGHBOUR]), m)
    a, b = perturb(m, family, 0.6, 3, [NEIGHBOUR]), perturb(m, family, 0.6, 3, [NEIGHBOUR])
    assert np.array_equal(a, b)
    assert iou(a, m) < 0.97


@pytest.mark.parametrize("family", ["dilate", "erode", "shift", "holes", "partial_drop", "bleed", "boundary_jitter"])
def test_iou_falls_with_severity(family):
    m = _disc()
    ious = [iou(perturb(m, family, s, 0, [NEIGHBOUR]), m) for s in (0.0, 0.25, 0.5, 1.0)]
    assert all(x > y for x, y in zip(ious, ious[1:])), ious


def test_family_specifics():
    m = _disc()
    assert (perturb(m, "dilate", 0.5, 0) >= m).all() and (perturb(m, "erode", 0.5, 0) <= m).all()
    grown = perturb(m, "bleed", 1.0, 0, [NEIGHBOUR])
    assert (grown & NEIGHBOUR).sum() == pytest.approx(0.5 * NEIGHBOUR.sum(), abs=1) and (grown >= m).all()
    box = perturb(m, "coarse", 1.0, 0)
    ys, xs = np.nonzero(m)
    assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    assert perturb(m, "holes", 1.0, 0).sum() <= 0.5 * m.sum() + 1
    shifted = perturb(m, "shift", 1.0, 0)
    assert shifted.sum() == m.sum()  # rigid: nothing lost while inside the image
    with pytest.raises(ValueError, match="unknown noise family"):
        perturb(m, "blur", 0.5, 0)


def test_boundary_f_score_hand_cases():
    m = np.zeros((50, 50), bool)
    m[10:30, 10:30] = True
    assert boundary_f_score(m, m) == 1.0
    far = np.zeros_like(m)
    far[35:45, 35:45] = True
    assert boundary_f_score(far, m, tolerance=1) == 0.0
    # shifted by one pixel: every boundary pixel within tolerance 1
    assert boundary_f_score(np.roll(m, 1, axis=1), m, tolerance=1) == 1.0
    assert boundary_f_score(np.zeros_like(m), m) == 0.0


def test_match_masks_is_the_optimal_assignment():
    a, b = np.zeros((10, 10), bool), np.zeros((10, 10), bool)
    a[:5], b[5:] = True, True
    big_a = a.copy()
    big_a[5] = True  # overlaps a (IoU 5/6) and b a little (IoU 1/9)
    # greedy on b would take big_a; the optimum gives big_a to a and the exact b to b
    assert match_masks([b.copy(), big_a], [a, b]) == [1, 0]
    assert match_masks([], [a]) == [None]
    assert match_masks([np.zeros_like(a)], [a]) == [None]


def _random_masks(rng, n, shape=(37, 53)):
    masks = [rng.random(shape) < p for p in rng.uniform(0.05, 0.6, n)]
    return masks + [np.zeros(shape, bool), np.ones(shape, bool)]


def test_iou_matrix_on_rles_equals_the_pixel_iou_exactly():
    from breakscene.scenes.masks import encode_rle, iou_matrix

    rng = np.random.default_rng(3)
    rows, cols = _random_masks(rng, 5), _random_masks(rng, 4)
    expected = np.array([[iou(r, c) for c in cols] for r in rows])
    assert expected[-2, -2] == 0.0 and expected[-1, -1] == 1.0  # two empty masks: 0, as before
    assert np.array_equal(iou_matrix(rows, cols), expected)  # bit for bit, not approximately
    stored = [encode_rle(m) for m in cols]  # the tables' form: str counts
    assert np.array_equal(iou_matrix(rows, stored), expected)
    assert iou_matrix([], cols).shape == (0, len(cols))
    with pytest.raises(ValueError, match="different sizes"):
        iou_matrix(rows, [np.zeros((10, 10), bool)])


def test_match_masks_on_stored_rles_is_the_brute_force_optimum():
    import itertools

    from breakscene.scenes.masks import encode_rle

    rng = np.random.default_rng(4)
    for _ in range(5):
        clean, found = _random_masks(rng, 2)[:3], _random_masks(rng, 3)[:4]
        matched = match_masks(found, clean)
        assert match_masks([encode_rle(m) for m in found], [encode_rle(m) for m in clean]) == matched
        best = max(itertools.permutations(range(len(found)), len(clean)),
                   key=lambda perm: sum(iou(clean[i], found[j]) for i, j in enumerate(perm)))
        total = sum(iou(clean[i], found[j]) for i, j in enumerate(matched) if j is not None)
        assert total == pytest.approx(sum(iou(clean[i], found[j]) for i, j in enumerate(best)))
