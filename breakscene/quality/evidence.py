"""Image-aware evidence about a mask: does it follow the photograph's objects?

Computed from the photograph and the mask only (no ground truth), in two steps so that
an image with many masks pays for the image work once:

1. ``image_evidence(image)``: the photo at a fixed analysis size (``ANALYSIS_SIDE`` on
   its long side), in CIE Lab, its gradient magnitude (Sobel, normalised by the image's
   own mean so that a low-contrast photo is not judged harsher), a quantised colour
   index, and SLIC superpixels at two scales (on the photo at ``SUPERPIXEL_SIDE``, a few
   iterations, labels scaled back up: superpixels are coarse by nature, and full-size SLIC
   was most of the image's cost).
2. ``mask_evidence(ev, mask)``: numbers about one mask, computed in a crop around it:

   - ``edge_boundary`` / ``edge_inside`` / ``edge_outside``: mean gradient on the mask's
     boundary (with a small tolerance: the local maximum within ``EDGE_TOLERANCE`` px)
     and in rings ``RING_FAR`` px inside and outside it; ``edge_alignment`` is
     log(boundary / mean(inside, outside)): > 0 when the boundary sits on image edges.
     ``edge_strong`` is the share of boundary pixels on a strong edge (the image's own
     80th percentile).
   - ``ring_contrast``: colour difference (Lab, per local cell, then averaged) between a
     thin ring inside the boundary and a thin ring outside it, in units of the image's
     colour spread; ``ring_histogram``: total-variation distance between the two rings'
     colour histograms; ``texture_contrast``: how different their gradient energy is.
     All three are 0 on a uniform image.
   - ``colour_separation`` and ``colour_iou``: a colour model of the mask against its
     surroundings (pixels within one equivalent radius). ``colour_iou`` is the IoU of the
     mask with the pixels that model calls foreground: low when the mask spills over the
     background (the spill's colour is the surroundings') or stops short of the object.
   - ``grabcut_iou`` / ``_precision`` / ``_recall``: one GrabCut iteration (OpenCV: colour
     mixtures plus a graph cut that prefers cuts on image edges) started from the mask,
     the mask as "probably foreground" and its surroundings as "probably background",
     compared with the mask. The strongest single predictor of the mask's IoU.
   - ``superpixel_cut`` / ``superpixel_iou`` (coarse and fine SLIC): the share of the
     mask's area in superpixels it only partly covers, and the IoU of the mask with its
     snap to superpixels (those it covers at least half of). A mask that cuts through
     homogeneous regions is suspect.

Everything is vectorised numpy/OpenCV/scikit-image; no per-pixel Python loops. Cost at 512 px
on one core (``python -m benchmarks quality``, ``timing.scoring``): GrabCut is most of a
mask's; the image's is shared by its masks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from skimage import segmentation

ANALYSIS_SIDE = 256  # px on the long side: evidence is about shapes and colours, not fine detail
EDGE_TOLERANCE = 3  # px (at analysis size): loose, hand-drawn masks sit a pixel or two off the edge
RING_NEAR = 3.0  # px: width of the thin rings for colour contrast
RING_FAR = (5.0, 9.0)  # px: rings "just inside" and "just outside" for the edge comparison
CELL = 16  # px: local cells for ring contrast (colour changes along a boundary)
COLOUR_BINS = 6  # per Lab channel: 216 colour bins
WEAK_CONTRAST = 0.15  # x the image's colour spread: a boundary cell with less is "not on an object edge"
GRABCUT_SIDE = 192  # px: GrabCut runs on the mask's crop scaled to this (speed; the shape survives)
GRABCUT_ITERATIONS = 1
SUPERPIXELS = {"coarse": 80, "fine": 300}  # SLIC segments per image
SUPERPIXEL_SIDE = 128  # px: SLIC runs at this long side (4x fewer pixels than ANALYSIS_SIDE)
SUPERPIXEL_ITERATIONS = 5  # SLIC's k-means iterations (its default 10 moves few labels after 5)

EVIDENCE_COLUMNS = [
    "edge_boundary", "edge_inside", "edge_outside", "edge_alignment", "edge_strong", "edge_weak",
    "ring_contrast", "ring_weak", "ring_histogram", "texture_contrast",
    "colour_separation", "colour_iou",
    "grabcut_iou", "grabcut_precision", "grabcut_recall",
    "superpixel_cut_coarse", "superpixel_iou_coarse", "superpixel_cut_fine", "superpixel_iou_fine",
]


@dataclass
class ImageEvidence:
    """Per-image arrays at analysis size (``shape``), shared by all of the image's masks."""

    shape: tuple[int, int]
    bgr: np.ndarray  # (h, w, 3) uint8, OpenCV's channel order
    lab: np.ndarray  # (h, w, 3) float32
    lab_scale: float  # colour spread of the image (Lab units), for unit-free contrasts
    grad: np.ndarray  # (h, w) float32, mean 1
    grad_max: np.ndarray  # local maximum of grad within EDGE_TOLERANCE
    strong_edge: float  # 80th percentile of grad
    weak_edge: float  # 50th percentile of grad
    colour: np.ndarray  # (h, w) int: quantised Lab colour index
    superpixels: dict[str, np.ndarray]  # name -> (h, w) int labels
    superpixel_sizes: dict[str, np.ndarray]


def analysis_shape(shape: tuple[int, int], side: int = ANALYSIS_SIDE) -> tuple[int, int]:
    """``shape`` scaled down to ``side`` px on its long side (never up)."""
    h, w = shape
    s = side / max(h, w)
    return (h, w) if s >= 1 else (max(1, round(h * s)), max(1, round(w * s)))


def image_evidence(image: np.ndarray) -> ImageEvidence:
    """``image``: (H, W, 3) uint8 RGB (grey or RGBA are converted)."""
    pil = Image.fromarray(np.asarray(image)).convert("RGB")
    h, w = analysis_shape((pil.height, pil.width))
    rgb = np.asarray(pil.resize((w, h), Image.BILINEAR) if (h, w) != (pil.height, pil.width) else pil)
    # OpenCV's float sRGB -> CIE Lab (D65, L 0..100): skimage's rgb2lab within 0.3 Lab units, 10x faster
    lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
    # Sobel on the three Lab channels at once (scale drops out: grad is divided by its mean)
    gx = cv2.Sobel(lab, cv2.CV_32F, 1, 0, ksize=3, borderType=cv2.BORDER_REFLECT)
    gy = cv2.Sobel(lab, cv2.CV_32F, 0, 1, ksize=3, borderType=cv2.BORDER_REFLECT)
    grad = np.sqrt((gx * gx + gy * gy).sum(axis=2))
    grad /= max(float(grad.mean()), 1e-6)
    # local maximum within EDGE_TOLERANCE (a dilation ignores the pixels beyond the border)
    grad_max = cv2.dilate(grad, np.ones((2 * EDGE_TOLERANCE + 1,) * 2, np.uint8))
    # Lab ranges: L 0..100, a and b about -110..110; uniform bins over a fixed range
    lo, hi = np.array([0, -110, -110], np.float32), np.array([100, 110, 110], np.float32)
    idx = np.clip(((lab - lo) / (hi - lo) * COLOUR_BINS).astype(np.int32), 0, COLOUR_BINS - 1)
    colour = (idx[..., 0] * COLOUR_BINS + idx[..., 1]) * COLOUR_BINS + idx[..., 2]
    sps, sizes = {}, {}
    sh, sw = analysis_shape((h, w), SUPERPIXEL_SIDE)
    small = rgb if (sh, sw) == (h, w) else cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    for name, n in SUPERPIXELS.items():
        # RGB in: slic rescales its input to [0, 1] before its own Lab conversion, so a Lab
        # input would lose its colour distances against the compactness term
        labels = segmentation.slic(small, n_segments=n, compactness=10, channel_axis=-1, start_label=0,
                                   enforce_connectivity=True, max_num_iter=SUPERPIXEL_ITERATIONS)
        if (sh, sw) != (h, w):  # nearest: every label keeps its pixels, none is invented
            labels = cv2.resize(labels.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
        sps[name], sizes[name] = labels, np.bincount(labels.ravel())
    spread = float(np.sqrt((cv2.meanStdDev(lab)[1] ** 2).sum()))
    weak, strong = np.percentile(grad, [50, 80])
    return ImageEvidence(shape=(h, w), bgr=np.ascontiguousarray(rgb[..., ::-1]), lab=lab,
                         lab_scale=max(spread, 1.0), grad=grad, grad_max=grad_max,
                         strong_edge=float(strong), weak_edge=float(weak),
                         colour=colour, superpixels=sps, superpixel_sizes=sizes)


def resize_to(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask at analysis size (area-averaged, then > 0.5)."""
    mask = np.asarray(mask, bool)
    if mask.shape == tuple(shape):
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.BOX)
    return np.asarray(img) > 127


def _crop_box(mask: np.ndarray, margin: int) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    h, w = mask.shape
    return (slice(max(0, rows[0] - margin), min(h, rows[-1] + margin + 1)),
            slice(max(0, cols[0] - margin), min(w, cols[-1] + margin + 1)))


def distance_to_outside(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of each ``mask`` pixel to the nearest pixel outside it (0 outside)."""
    return cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)


def _mean(values: np.ndarray, where: np.ndarray) -> float:
    return float(values[where].mean()) if where.any() else 0.0


def grabcut_agreement(bgr: np.ndarray, mask: np.ndarray, surround: np.ndarray) -> tuple[float, float, float]:
    """IoU, precision and recall of ``mask`` against one GrabCut iteration started from it
    (mask: probably foreground; ``surround``: probably background; beyond: background),
    run on the crop scaled to at most ``GRABCUT_SIDE`` px. Precision < 1: GrabCut drops part
    of the mask (a spill); recall < 1: it adds some (the mask stops short)."""
    f = min(1.0, GRABCUT_SIDE / max(mask.shape))
    init = np.where(mask, cv2.GC_PR_FGD, np.where(surround, cv2.GC_PR_BGD, cv2.GC_BGD)).astype(np.uint8)
    if f < 1:
        size = (max(1, round(mask.shape[1] * f)), max(1, round(mask.shape[0] * f)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        init = cv2.resize(init, size, interpolation=cv2.INTER_NEAREST)
    start = init == cv2.GC_PR_FGD
    if start.all() or not start.any():
        return 0.0, 0.0, 0.0
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(0)  # GrabCut seeds its colour mixtures with k-means: same mask, same answer
    try:
        cv2.grabCut(np.ascontiguousarray(bgr), init, None, bgd, fgd, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    except cv2.error:  # a colour model without enough distinct pixels (e.g. a flat crop)
        return 0.0, 0.0, 0.0
    result = (init == cv2.GC_PR_FGD) | (init == cv2.GC_FGD)
    inter = float((result & start).sum())
    union = float((result | start).sum())
    return inter / union, inter / max(1.0, float(result.sum())), inter / float(start.sum())


def empty_evidence() -> dict:
    return {k: 0.0 for k in EVIDENCE_COLUMNS}


def mask_evidence(ev: ImageEvidence, mask: np.ndarray) -> dict:
    """Evidence columns (``EVIDENCE_COLUMNS``) for one mask of the image ``ev`` describes;
    the mask may be at full or analysis size."""
    m_full = resize_to(mask, ev.shape)
    if not m_full.any() or m_full.all():
        return empty_evidence()
    radius = math.sqrt(m_full.sum() / math.pi)
    ys, xs = _crop_box(m_full, int(math.ceil(radius)) + int(RING_FAR[1]) + 1)
    m = m_full[ys, xs]
    # distances to the other side of the boundary: 1 on the pixels next to it
    # (OpenCV's exact Euclidean transform: scipy's distance_transform_edt, 3x faster)
    d_in = distance_to_outside(m)
    d_out = distance_to_outside(~m)
    surround = ~m & (d_out <= radius)  # within one equivalent radius of the mask
    out = _edge_terms(ev, ys, xs, m, d_in, d_out)
    out.update(_ring_terms(ev, ys, xs, m, d_in, d_out))
    out.update(_colour_terms(ev.colour[ys, xs], m, surround))
    # GrabCut from the mask: where colour models and image edges would put the object
    out["grabcut_iou"], out["grabcut_precision"], out["grabcut_recall"] = grabcut_agreement(
        ev.bgr[ys, xs], m, surround)
    out.update(_superpixel_terms(ev, m_full))
    return out


def _edge_terms(ev: ImageEvidence, ys: slice, xs: slice, m: np.ndarray, d_in: np.ndarray,
                d_out: np.ndarray) -> dict:
    """How strongly image edges run along the boundary, against just inside and outside it."""
    grad, grad_max = ev.grad[ys, xs], ev.grad_max[ys, xs]
    on_boundary = (m & (d_in < 1.5)) | (~m & (d_out < 1.5))
    inside = m & (d_in >= RING_FAR[0]) & (d_in <= RING_FAR[1])
    outside = ~m & (d_out >= RING_FAR[0]) & (d_out <= RING_FAR[1])
    out = {"edge_boundary": _mean(grad_max, on_boundary), "edge_inside": _mean(grad, inside),
           "edge_outside": _mean(grad, outside)}
    around = 0.5 * (out["edge_inside"] + out["edge_outside"])
    out["edge_alignment"] = math.log((out["edge_boundary"] + 0.05) / (around + 0.05))
    out["edge_strong"] = _mean(grad_max > ev.strong_edge, on_boundary)
    out["edge_weak"] = _mean(grad_max <= ev.weak_edge, on_boundary)
    return out


def _ring_terms(ev: ImageEvidence, ys: slice, xs: slice, m: np.ndarray, d_in: np.ndarray,
                d_out: np.ndarray) -> dict:
    """Colour and texture of thin rings either side of the boundary, compared cell by cell."""
    ring_in = m & (d_in <= RING_NEAR)
    ring_out = ~m & (d_out <= RING_NEAR)
    lab = ev.lab[ys, xs]
    cy, cx = np.indices(m.shape)
    cells = (cy // CELL) * (m.shape[1] // CELL + 1) + cx // CELL
    n_cells = int(cells.max()) + 1

    def cell_sums(ring):
        c = cells[ring]
        n = np.bincount(c, minlength=n_cells).astype(np.float64)
        s = np.stack([np.bincount(c, lab[..., k][ring], minlength=n_cells) for k in range(3)], 1)
        return n, s

    n_in, s_in = cell_sums(ring_in)
    n_out, s_out = cell_sums(ring_out)
    both = (n_in > 0) & (n_out > 0)
    out = {}
    if both.any():
        diff = np.linalg.norm(s_in[both] / n_in[both, None] - s_out[both] / n_out[both, None], axis=1)
        weight = np.minimum(n_in[both], n_out[both])
        out["ring_contrast"] = float((diff * weight).sum() / weight.sum() / ev.lab_scale)
        out["ring_weak"] = float(weight[diff < WEAK_CONTRAST * ev.lab_scale].sum() / weight.sum())
    else:
        out["ring_contrast"], out["ring_weak"] = 0.0, 1.0
    col = ev.colour[ys, xs]
    n_bins = COLOUR_BINS ** 3
    h_in = np.bincount(col[ring_in], minlength=n_bins) / max(1, ring_in.sum())
    h_out = np.bincount(col[ring_out], minlength=n_bins) / max(1, ring_out.sum())
    out["ring_histogram"] = float(0.5 * np.abs(h_in - h_out).sum())
    grad = ev.grad[ys, xs]
    e_in, e_out = _mean(grad, ring_in), _mean(grad, ring_out)
    out["texture_contrast"] = abs(e_in - e_out) / (e_in + e_out + 0.05)
    return out


def _colour_terms(col: np.ndarray, m: np.ndarray, surround: np.ndarray) -> dict:
    """A colour-histogram model of the mask against its surroundings."""
    n_bins = COLOUR_BINS ** 3
    f_hist = np.bincount(col[m], minlength=n_bins) / m.sum()
    b_hist = np.bincount(col[surround], minlength=n_bins) / max(1, surround.sum())
    region = m | surround
    fg = (f_hist[col] > b_hist[col]) & region
    union = (fg | m).sum()
    return {"colour_separation": float(0.5 * np.abs(f_hist - b_hist).sum()),
            "colour_iou": float((fg & m).sum() / union) if union else 0.0}


def _superpixel_terms(ev: ImageEvidence, m_full: np.ndarray) -> dict:
    """How much of the mask's area cuts through superpixels; IoU with the snapped ones."""
    area = m_full.sum()
    out = {}
    for name, labels in ev.superpixels.items():
        sizes = ev.superpixel_sizes[name]
        covered = np.bincount(labels[m_full], minlength=len(sizes)).astype(np.float64)
        touched = covered > 0
        cut = np.minimum(covered, sizes - covered)[touched].sum() / area
        snapped = touched & (covered >= 0.5 * sizes)
        inter = covered[snapped].sum()
        union = area + sizes[snapped].sum() - inter
        out[f"superpixel_cut_{name}"] = float(cut)
        out[f"superpixel_iou_{name}"] = float(inter / union) if union else 0.0
    return out
