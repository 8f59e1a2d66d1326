"""Mask quality: one score that estimates the mask's IoU with the object, from the
photograph and the mask only.

``quality`` is the predicted IoU in [0, 1] of a small versioned model
(``breakscene/quality/model.py``, shipped as ``breakscene/quality/data/quality_model_v1.json``,
fitted and evaluated leave-one-scene-out by ``python -m benchmarks quality``) applied to:

- image evidence (``breakscene/quality/evidence.py``): edge alignment of the boundary,
  colour and texture contrast across it, a colour model and GrabCut started from the mask,
  agreement with superpixels;
- shape terms of the mask alone (below): largest_component_fraction (share of the area in
  the largest connected part), hole_fraction (share of the filled outline that is a hole),
  compactness (4*pi*area / perimeter**2), roughness (1 - compactness), border_contact
  (share of the image border the mask touches), n_components, area_fraction;
- SAM's predicted_iou and stability_score where present (blended in with a fixed weight;
  masks from users, the classical segmenter and the study have none).

``quality_version`` names the model. ``center_fraction`` (share of the mask inside the
image's centre square, which is what the extractor trains on) and ``max_overlap`` (with the
image's other masks) are reported and used by selection, not by the score. The earlier,
shape-only score is kept as ``shape_score`` (the benchmark's "old" column).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import measure

from breakscene.scenes.masks import center_fraction, iou
from breakscene.quality.evidence import ImageEvidence, empty_evidence, image_evidence, mask_evidence
from breakscene.quality.model import QualityModel, load_model

SHAPE_COLUMNS = ["area_fraction", "center_fraction", "n_components", "largest_component_fraction",
                 "hole_fraction", "compactness", "roughness", "border_contact", "max_overlap"]


def shape_features(mask: np.ndarray, others: list[np.ndarray] = (), gt_masks: list[np.ndarray] = ()) -> dict:
    """Geometric terms of one mask (no image needed), plus ``max_overlap`` with ``others``
    and ``gt_iou`` with the best of ``gt_masks`` (None without ground truth)."""
    mask = np.asarray(mask, bool)
    area = int(mask.sum())
    h, w = mask.shape
    feats: dict = {"area_fraction": area / (h * w), "center_fraction": center_fraction(mask)}
    if area == 0:
        feats.update(n_components=0, largest_component_fraction=0.0, hole_fraction=0.0, compactness=0.0,
                     roughness=1.0, border_contact=0.0, max_overlap=0.0, gt_iou=None)
        return feats
    # the mask's bounding box with a 1-pixel empty frame: same numbers, less work
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = np.pad(mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], 1)
    labels, n = ndimage.label(crop)
    largest = np.bincount(labels.ravel())[1:].max()
    filled = ndimage.binary_fill_holes(crop)
    perimeter = measure.perimeter(crop)
    compactness = min(1.0, 4 * math.pi * area / perimeter**2) if perimeter > 0 else 1.0
    border = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    overlaps = [np.logical_and(mask, o).sum() / max(1, min(area, int(o.sum()))) for o in others]
    feats.update(
        n_components=int(n),
        largest_component_fraction=float(largest / area),
        hole_fraction=float(1 - area / filled.sum()),
        compactness=float(compactness),
        roughness=float(1 - compactness),
        border_contact=float(border.mean()),
        max_overlap=float(max(overlaps, default=0.0)),
        gt_iou=max((iou(mask, g) for g in gt_masks), default=None),
    )
    return feats


def mask_features(mask: np.ndarray, image: np.ndarray | ImageEvidence, *, others: list[np.ndarray] = (),
                  predicted_iou: float | None = None, stability_score: float | None = None,
                  gt_masks: list[np.ndarray] = (), model: QualityModel | None = None) -> dict:
    """Shape terms, image evidence, SAM's scores and ``quality`` (the predicted IoU) of one
    mask of ``image`` (an RGB array, or its ``image_evidence`` when scoring many masks)."""
    model = model or load_model()
    ev = image if isinstance(image, ImageEvidence) else image_evidence(image)
    feats = shape_features(mask, others, gt_masks)
    feats.update(predicted_iou=predicted_iou, stability_score=stability_score, quality_version=model.version)
    if feats["area_fraction"] == 0:
        feats.update(empty_evidence(), quality=0.0)
        return feats
    feats.update(mask_evidence(ev, mask))
    feats["quality"] = model.predict(feats)
    return feats


def score_masks(image: np.ndarray, masks: list[np.ndarray], *, predicted_ious: list[float | None] | None = None,
                stability_scores: list[float | None] | None = None, gt_masks: list[np.ndarray] = (),
                model: QualityModel | None = None) -> list[dict]:
    """``mask_features`` for every mask of one image, the image evidence computed once;
    ``max_overlap`` is against the image's other masks."""
    ev = image_evidence(image)
    n = len(masks)
    pious = predicted_ious or [None] * n
    stabs = stability_scores or [None] * n
    return [mask_features(m, ev, others=[o for j, o in enumerate(masks) if j != i], predicted_iou=pious[i],
                          stability_score=stabs[i], gt_masks=gt_masks, model=model)
            for i, m in enumerate(masks)]


def shape_score(f: dict) -> float:
    """The earlier, shape-only score (quality version "shape-v0"): SAM's confidence x
    largest_component_fraction x (1 - hole_fraction) x sqrt(compactness) x
    sqrt(1 - border_contact). Kept for comparison; it does not predict IoU."""
    conf = 1.0
    if f.get("predicted_iou") is not None:
        conf *= min(1.0, max(0.0, f["predicted_iou"]))
    if f.get("stability_score") is not None:
        conf *= min(1.0, max(0.0, f["stability_score"]))
    if not f.get("area_fraction"):
        return 0.0
    score = (conf * f["largest_component_fraction"] * (1 - f["hole_fraction"])
             * math.sqrt(f["compactness"]) * math.sqrt(1 - f["border_contact"]))
    return float(score)


def select_masks(features: list[dict], masks: list[np.ndarray], max_concepts: int, min_quality: float,
                 min_area: float, max_area: float, max_overlap: float,
                 min_center_fraction: float = 0.8) -> tuple[list[int], str | None]:
    """Greedy selection by quality: in area range, mostly inside the centre square, above
    ``min_quality``, overlapping an already chosen mask by at most ``max_overlap`` (of the
    smaller mask). Returns the chosen indices (in image order) and, when none is usable,
    the reason."""
    candidates = [i for i, f in enumerate(features)
                  if min_area <= f["area_fraction"] <= max_area and f["quality"] >= min_quality
                  and f["center_fraction"] >= min_center_fraction]
    if not features:
        return [], "no mask was found"
    if not candidates:
        return [], (f"no mask passes the thresholds (area {min_area}-{max_area} of the image, "
                    f"quality >= {min_quality}, centre-square share >= {min_center_fraction}); best quality {max(f['quality'] for f in features):.3f}")
    chosen: list[int] = []
    for i in sorted(candidates, key=lambda i: -features[i]["quality"]):
        a = masks[i]
        fits = all(np.logical_and(a, masks[j]).sum() / max(1, min(a.sum(), masks[j].sum())) <= max_overlap
                   for j in chosen)
        if fits:
            chosen.append(i)
        if len(chosen) == max_concepts:
            break
    return sorted(chosen), None
