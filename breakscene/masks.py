"""Pure mask helpers: decoding a mask image to booleans, resizing, RLE, IoU.

No file I/O here; see ``scene.py`` for reading files.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as coco_mask

# A mask "binarises" when few of its pixels sit far from both 0 and 255: anti-aliased
# edges are fine, a photograph given as a mask is not.
MID_LOW, MID_HIGH = 32, 223
MAX_MID_FRACTION = 0.10


def mask_channel(img: Image.Image) -> np.ndarray:
    """The uint8 plane that carries the mask: alpha if only alpha varies, else channel 0."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        return arr.astype(np.uint8) if arr.dtype != bool else arr.astype(np.uint8) * 255
    if arr.shape[-1] in (2, 4):
        alpha, color = arr[..., -1], arr[..., 0]
        if alpha.min() != alpha.max() and color.min() == color.max():
            return alpha
    return arr[..., 0]


def mid_fraction(plane: np.ndarray) -> float:
    return float(((plane > MID_LOW) & (plane < MID_HIGH)).mean())


def binarize(plane: np.ndarray) -> np.ndarray:
    return plane > 127


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a boolean mask to (width, height)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.resize(size, Image.NEAREST)) > 127


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


def decode_rle(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    obj = {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return coco_mask.decode(obj).astype(bool)
