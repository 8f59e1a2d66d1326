"""Pure mask helpers, each written once: decoding a mask image to booleans, resizing,
the centre square the extractor trains on, RLE, IoU.

No file I/O here; see ``scene.py`` for reading files.
"""
from __future__ import annotations

from itertools import combinations
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask

# A mask "binarises" when few of its pixels sit far from both 0 and 255: anti-aliased
# edges are fine, a photograph given as a mask is not.
MID_LOW, MID_HIGH = 32, 223
MAX_MID_FRACTION = 0.10


# Two concept masks whose tokens fight over one region (the attention loss asks each token
# to cover its own mask and nothing else): nearly the same pixels, or one nearly all inside
# the other. Masks drawn by hand share a few edge pixels; these thresholds leave that alone.
SAME_REGION_IOU = 0.9
CONTAINED_SHARE = 0.9


# Single-plane modes of more than 8 bits and their largest value ("I" is how 16-bit PNG
# and TIFF files decode); float planes ("F") are 0..1, or 0..255 when they exceed 1.
HIGH_DEPTH_RANGE = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def unit_plane(img: Image.Image) -> np.ndarray | None:
    """A 16-bit, 32-bit or float plane as floats in [0, 1], scaled by its mode's range (not
    clipped to 255); None for 8-bit modes, which PIL converts correctly itself."""
    if img.mode not in HIGH_DEPTH_RANGE and img.mode != "F":
        return None
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    full = HIGH_DEPTH_RANGE.get(img.mode) or (1.0 if arr.max(initial=0) <= 1.0 else 255.0)
    return np.clip(arr / full, 0, 1)


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def mask_plane(img: Image.Image) -> np.ndarray:
    """The uint8 plane (0..255) that carries a mask, chosen by the file's mode: the alpha
    channel when the file has one that is not constant (a cut-out), else the brightness
    (the brightest channel of a colour mask) scaled by the mode's range. A plane with
    exactly two levels, the lower one 0 (0/1 masks, a palette index, 0/38 colours), is
    binary: every non-zero pixel is foreground."""
    if has_alpha(img):
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha
    unit = unit_plane(img)
    if unit is None:
        if img.mode in ("1", "L"):
            unit = np.asarray(img, dtype=np.float64) / (1 if img.mode == "1" else 255)
        else:  # RGB, P (the palette's colours, not their indices), CMYK, ...
            unit = np.asarray(img.convert("RGB")).max(axis=-1) / 255.0
    levels = np.unique(unit)
    if len(levels) == 2 and levels[0] == 0:
        return (unit > 0).astype(np.uint8) * 255
    return np.round(unit * 255).astype(np.uint8)


def mid_fraction(plane: np.ndarray) -> float:
    return float(((plane > MID_LOW) & (plane < MID_HIGH)).mean())


def binarize(plane: np.ndarray) -> np.ndarray:
    return plane > 127


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to (width, height) (no copy when it has
    that size already)."""
    if mask.shape == (size[1], size[0]):
        return np.asarray(mask, dtype=bool)
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize(size, Image.NEAREST)) > 127


def center_square(size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the largest centred square of a (width, height) image:
    the part the extractor crops and trains on."""
    w, h = size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def center_fraction(mask: np.ndarray) -> float:
    """The share of the mask's pixels inside the centre square (0 for an empty mask)."""
    left, top, right, bottom = center_square((mask.shape[1], mask.shape[0]))
    total = mask.sum()
    return float(mask[top:bottom, left:right].sum() / total) if total else 0.0


def downsample(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-average float masks (..., H, W) to (..., h, w): each cell is its covered fraction."""
    lead = masks.shape[:-2]
    flat = masks.reshape(-1, 1, *masks.shape[-2:]).float()
    out = F.interpolate(flat, size=size, mode="area")
    return out.reshape(*lead, *size)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a boolean HxW mask, with ``counts`` as str (JSON/Parquet friendly)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _coco_rle(mask) -> dict:
    """pycocotools' own RLE (bytes counts) of a boolean mask or of a stored RLE dict."""
    if isinstance(mask, dict):
        counts = mask["counts"]
        return {"size": list(mask["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.encode(np.asfortranarray(np.asarray(mask).astype(np.uint8)))


def decode_rle(rle: dict) -> np.ndarray:
    return coco_mask.decode(_coco_rle(rle)).astype(bool)


def iou_matrix(rows: list, cols: list) -> np.ndarray:
    """IoU of every mask in ``rows`` with every mask in ``cols`` (len(rows) x len(cols)),
    by ``pycocotools.mask.iou`` on run-length encodings: masks may be HxW booleans or RLE
    dicts as stored in the tables (no decoding). Equal to ``iou`` pair by pair (0 for two
    empty masks)."""
    if not rows or not cols:
        return np.zeros((len(rows), len(cols)))
    a, b = [_coco_rle(m) for m in rows], [_coco_rle(m) for m in cols]
    sizes = {tuple(int(v) for v in r["size"]) for r in a + b}
    if len(sizes) > 1:  # pycocotools would compare them anyway, wrongly
        raise ValueError(f"masks of different sizes: {sorted(sizes)}")
    return np.asarray(coco_mask.iou(a, b, [0] * len(b)), dtype=np.float64).reshape(len(a), len(b))


class Overlap(NamedTuple):
    smaller: int  # index of the mask with fewer pixels
    larger: int
    iou: float
    contained: float  # share of the smaller mask's pixels inside the larger


def overlapping_pairs(masks: list) -> list[Overlap]:
    """The pairs of masks that are nearly one region (IoU >= ``SAME_REGION_IOU``) or one
    inside the other (>= ``CONTAINED_SHARE`` of the smaller inside the larger), from the
    IoU matrix: the intersection is IoU x (|A| + |B|) / (1 + IoU)."""
    areas = [float(np.count_nonzero(m)) for m in masks]
    ious = iou_matrix(list(masks), list(masks))
    found = []
    for i, j in combinations(range(len(masks)), 2):
        small, large = (i, j) if areas[i] <= areas[j] else (j, i)
        iou = float(ious[i, j])
        contained = iou * (areas[i] + areas[j]) / (1 + iou) / areas[small] if areas[small] else 0.0
        if iou >= SAME_REGION_IOU or contained >= CONTAINED_SHARE:
            found.append(Overlap(small, large, iou, min(1.0, round(contained, 6))))
    return found
