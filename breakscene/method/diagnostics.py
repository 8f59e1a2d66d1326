"""Attention diagnostics: how well each token's cross-attention map matches the masks."""
from __future__ import annotations

import numpy as np

from breakscene.scenes.masks import iou


def attention_diagnostic(maps: np.ndarray, masks: np.ndarray, threshold: float = 0.5) -> list[dict]:
    """Compare token maps with reference masks.

    maps: (K, h, w) non-negative attention maps, token k in row k.
    masks: (M, h, w) boolean reference masks; mask k belongs to token k (for k < M).
    Each map is divided by its maximum and thresholded at ``threshold`` for IoU.
    Returns per token: ``attention_iou`` (IoU with its own mask), ``ious`` (with every
    mask), ``assigned_mask`` (the mask with the highest IoU) and ``mass_in_mask`` (the
    share of the map's total mass inside its own mask: 1 - leakage).
    """
    out = []
    for k, amap in enumerate(maps):
        amap = np.asarray(amap, dtype=np.float64)
        peak = amap.max()
        binary = amap / peak >= threshold if peak > 0 else np.zeros_like(amap, dtype=bool)
        ious = [iou(binary, m) for m in masks]
        total = amap.sum()
        own = masks[k] if k < len(masks) else np.zeros_like(binary)
        out.append({
            "attention_iou": ious[k] if k < len(masks) else 0.0,
            "ious": [round(v, 6) for v in ious],
            "assigned_mask": int(np.argmax(ious)) if ious else -1,
            "mass_in_mask": float((amap * own).sum() / total) if total > 0 else 0.0,
        })
    return out
