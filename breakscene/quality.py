"""Mask quality: geometric features of a mask and one documented score in [0, 1].

The score multiplies terms that are each 1 for a clean object mask and fall towards 0
as the mask gets worse:

    quality = confidence x largest_component_fraction x (1 - hole_fraction)
              x sqrt(compactness) x sqrt(1 - border_contact)

- confidence: SAM's predicted_iou x stability_score when present (clipped to [0, 1]),
  else 1 (user masks and weight-free segmenters carry no self-assessment).
- largest_component_fraction: share of the mask's area in its largest connected part.
- hole_fraction: share of the filled outline that is a hole.
- compactness: 4*pi*area / perimeter**2 (1 for a disc, near 0 for ragged outlines).
- border_contact: share of the image border that the mask touches (background-like
  regions hug the border).

``center_fraction`` (the share of the mask inside the image's centre square, which is what
the extractor trains on) is reported and used by selection, not by the score. Overlap
with other masks is reported (``max_overlap``) and used by selection, not by
the score, because it depends on the other masks rather than on this one.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage import measure


def mask_features(mask: np.ndarray, others: list[np.ndarray] = (), predicted_iou: float | None = None,
                  stability_score: float | None = None, gt_masks: list[np.ndarray] = ()) -> dict:
    mask = mask.astype(bool)
    area = int(mask.sum())
    h, w = mask.shape
    feats: dict = {"area_fraction": area / (h * w), "predicted_iou": predicted_iou,
                   "stability_score": stability_score, "center_fraction": center_fraction(mask)}
    if area == 0:
        feats.update(n_components=0, largest_component_fraction=0.0, hole_fraction=0.0, compactness=0.0,
                     roughness=1.0, border_contact=0.0, max_overlap=0.0, quality=0.0, gt_iou=None)
        return feats
    labels, n = ndimage.label(mask)
    largest = np.bincount(labels.ravel())[1:].max()
    filled = ndimage.binary_fill_holes(mask)
    perimeter = measure.perimeter(mask)
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
        gt_iou=max((_iou(mask, g) for g in gt_masks), default=None),
    )
    feats["quality"] = quality_score(feats)
    return feats


def center_fraction(mask: np.ndarray) -> float:
    h, w = mask.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    total = mask.sum()
    return float(mask[top:top + s, left:left + s].sum() / total) if total else 0.0


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def quality_score(f: dict) -> float:
    conf = 1.0
    if f.get("predicted_iou") is not None:
        conf *= min(1.0, max(0.0, f["predicted_iou"]))
    if f.get("stability_score") is not None:
        conf *= min(1.0, max(0.0, f["stability_score"]))
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
