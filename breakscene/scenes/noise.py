"""Mask perturbations for the robustness study: seeded families with a severity in [0, 1].

Severity 0 returns the clean mask for every family; larger values are worse. Each family
scales with the object's own size (its equivalent radius), so a severity means the same
thing for a small and a large concept. Pure functions of (mask, severity, rng[, others]).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage
from skimage import measure, draw


def _radius(mask: np.ndarray) -> float:
    """Equivalent radius of the mask (radius of a disc of the same area)."""
    return math.sqrt(mask.sum() / math.pi)


def _disk(r: int) -> np.ndarray:
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def dilate(mask, severity, rng, others=()):
    r = int(round(severity * 0.5 * _radius(mask)))
    return ndimage.binary_dilation(mask, _disk(r)) if r > 0 else mask.copy()


def erode(mask, severity, rng, others=()):
    r = int(round(severity * 0.5 * _radius(mask)))
    out = ndimage.binary_erosion(mask, _disk(r)) if r > 0 else mask.copy()
    return out


def boundary_jitter(mask, severity, rng, others=()):
    """A smooth random field moves the boundary in and out by up to severity x radius/2."""
    if severity <= 0:
        return mask.copy()
    h, w = mask.shape
    amplitude = severity * 0.5 * _radius(mask)
    coarse = rng.normal(size=(max(2, h // 16), max(2, w // 16)))
    field = ndimage.zoom(coarse, (h / coarse.shape[0], w / coarse.shape[1]), order=3)[:h, :w]
    field = field / (np.abs(field).max() + 1e-9) * amplitude
    signed = ndimage.distance_transform_edt(mask) - ndimage.distance_transform_edt(~mask)
    return signed + field > 0


def shift(mask, severity, rng, others=()):
    """Rigid shift in a random direction by severity x radius."""
    dist = severity * _radius(mask)
    angle = rng.uniform(0, 2 * math.pi)
    dy, dx = int(round(dist * math.sin(angle))), int(round(dist * math.cos(angle)))
    out = np.zeros_like(mask)
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    ys, xs = ys + dy, xs + dx
    keep = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    out[ys[keep], xs[keep]] = True
    return out


def holes(mask, severity, rng, others=()):
    """Random discs removed from inside the mask until severity x 50% of its area is gone."""
    out = mask.copy()
    target = mask.sum() * (1 - 0.5 * severity)
    r = max(1, int(0.15 * _radius(mask)))
    ys, xs = np.nonzero(mask)
    for _ in range(10000):
        if out.sum() <= target or not len(ys):
            break
        i = rng.integers(len(ys))
        rr, cc = draw.disk((ys[i], xs[i]), r, shape=mask.shape)
        out[rr, cc] = False
    return out


def bleed(mask, severity, rng, others=()):
    """The mask grows into a neighbouring region: the nearest other mask if any, else the
    surroundings, by severity x 50% of that region's area."""
    neighbour = None
    if others:
        dist = ndimage.distance_transform_edt(~mask)
        neighbour = min(others, key=lambda o: dist[o].min() if o.any() else np.inf)
    region = neighbour if neighbour is not None and neighbour.any() else ndimage.binary_dilation(
        mask, _disk(max(1, int(_radius(mask)))) ) & ~mask
    if severity <= 0 or not region.any():
        return mask.copy()
    # grow from the mask towards the region: take the region's pixels nearest the mask first
    dist = ndimage.distance_transform_edt(~mask)
    candidates = np.flatnonzero(region & ~mask)
    order = candidates[np.argsort(dist.ravel()[candidates], kind="stable")]
    take = order[: int(round(severity * 0.5 * region.sum()))]
    out = mask.copy().ravel()
    out[take] = True
    return out.reshape(mask.shape)


def partial_drop(mask, severity, rng, others=()):
    """A random half-plane through the object removes up to severity x 60% of it."""
    if severity <= 0:
        return mask.copy()
    ys, xs = np.nonzero(mask)
    angle = rng.uniform(0, 2 * math.pi)
    proj = ys * math.sin(angle) + xs * math.cos(angle)
    cut = np.quantile(proj, 1 - 0.6 * severity)
    out = mask.copy()
    out[ys[proj > cut], xs[proj > cut]] = False
    return out


def coarse(mask, severity, rng, others=()):
    """Severity < 0.5: polygon simplification (tolerance grows with severity);
    severity >= 0.5: the bounding box."""
    if severity <= 0:
        return mask.copy()
    if severity >= 0.5:
        ys, xs = np.nonzero(mask)
        out = np.zeros_like(mask)
        out[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        return out
    tolerance = severity * _radius(mask)
    out = np.zeros_like(mask)
    for contour in measure.find_contours(np.pad(mask, 1).astype(float), 0.5):
        poly = measure.approximate_polygon(contour, tolerance) - 1
        rr, cc = draw.polygon(poly[:, 0], poly[:, 1], shape=mask.shape)
        out[rr, cc] = ~out[rr, cc]  # even-odd: holes stay holes
    return out


FAMILIES: dict[str, Callable] = {
    "dilate": dilate, "erode": erode, "boundary_jitter": boundary_jitter, "shift": shift, "holes": holes,
    "bleed": bleed, "partial_drop": partial_drop, "coarse": coarse,
}


def perturb(mask: np.ndarray, family: str, severity: float, seed: int, others: list[np.ndarray] = ()) -> np.ndarray:
    if family not in FAMILIES:
        raise ValueError(f"unknown noise family {family!r}; known: {', '.join(FAMILIES)}")
    if not 0 <= severity <= 1:
        raise ValueError(f"severity must be in [0, 1], got {severity}")
    return FAMILIES[family](mask.astype(bool), float(severity), np.random.default_rng(seed), list(others))


def boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def boundary_f_score(pred: np.ndarray, gt: np.ndarray, tolerance: float | None = None) -> float:
    """F-measure of boundary pixels matched within ``tolerance`` pixels (default: 0.75% of
    the image diagonal, as in the DAVIS benchmark)."""
    if tolerance is None:
        tolerance = max(1.0, 0.0075 * math.hypot(*gt.shape))
    bp, bg = boundary(pred.astype(bool)), boundary(gt.astype(bool))
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    precision = (ndimage.distance_transform_edt(~bg)[bp] <= tolerance).mean()
    recall = (ndimage.distance_transform_edt(~bp)[bg] <= tolerance).mean()
    return float(2 * precision * recall / (precision + recall)) if precision + recall else 0.0


def match_masks(candidates: list, clean: list) -> list[int | None]:
    """Optimal one-to-one assignment of candidate masks to clean masks by IoU (Hungarian);
    returns, per clean mask, the index of its candidate (None when unmatched or IoU 0).
    Masks are HxW booleans or stored COCO RLEs; IoUs come from pycocotools on the RLEs."""
    from scipy.optimize import linear_sum_assignment

    from breakscene.scenes.masks import iou_matrix

    if not candidates:
        return [None] * len(clean)
    scores = iou_matrix(list(clean), list(candidates))
    rows, cols = linear_sum_assignment(-scores)
    out: list[int | None] = [None] * len(clean)
    for r, c in zip(rows, cols):
        if scores[r, c] > 0:
            out[r] = int(c)
    return out
