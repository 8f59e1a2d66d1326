"""Mask quality benchmark: does the score predict the mask's IoU on scenes it never saw?

Noisy masks come from the example scenes (photo + clean masks) through every family of
``breakscene.scenes.noise`` at each severity and seed (seed * 1000 + concept, as the study
perturbs); severity 0 is the clean mask, counted once. True quality = IoU with the clean
mask. Leave-one-scene-out: for each scene the model is fitted on the other scenes' masks
and predicts this scene's, so every prediction comes from a model that never saw the
scene. Reports Spearman correlation with the IoU and the AUC of good (IoU >= 0.8) against
bad (IoU < 0.5), overall and per family (severity > 0), for the old shape-only score and the
new one, and CPU seconds per mask and per image: ``timing.scoring`` times the example photos'
own masks as the pipeline scores them (``seconds_per_mask`` = its ``ms_per_mask``: each mask
with its share of the image's work, at ``masks_per_image``).

``--fit`` also fits the shipped model on every scene and writes
``breakscene/quality/data/quality_model_v1.json`` (deterministic: same inputs, same file).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from breakscene.scenes.noise import FAMILIES, perturb
from breakscene.quality.score import shape_features, shape_score
from breakscene.quality.evidence import image_evidence, mask_evidence
from breakscene.quality.model import MODEL_FILE, fit_model

# The fitted model's inputs: GrabCut agreement carries most of the signal; the shape terms
# catch holes and fragments that GrabCut alone forgives. Chosen leave-one-scene-out.
MODEL_FEATURES = ["grabcut_iou", "grabcut_precision", "grabcut_recall", "hole_fraction",
                  "largest_component_fraction"]
MODEL_VERSION = "quality-v1"
RIDGE_ALPHA = 1.0
GOOD, BAD = 0.8, 0.5
MODEL_PATH = Path(__file__).resolve().parents[1] / "breakscene" / "quality" / "data" / MODEL_FILE


def load_example_scenes(root: Path) -> list[tuple[str, np.ndarray, list[np.ndarray]]]:
    """``root/<scene>/img.jpg`` with ``mask<i>.png`` (concept where channel 0 > 127)."""
    from breakscene.scenes.scene import load_mask_image, mask_from_image
    from PIL import Image

    scenes = []
    for folder in sorted(p for p in Path(root).iterdir() if (p / "img.jpg").is_file()):
        image = np.asarray(Image.open(folder / "img.jpg").convert("RGB"))
        size = (image.shape[1], image.shape[0])
        masks = [mask_from_image(load_mask_image(str(m)), str(m), size, [])
                 for m in sorted(folder.glob("mask*.png"), key=lambda p: int(p.stem[4:] or 0))]
        scenes.append((folder.name, image, masks))
    if len(scenes) < 2:
        raise ValueError(f"{root} holds {len(scenes)} scene(s) with img.jpg; leave-one-scene-out needs 2")
    return scenes


def noisy_rows(scenes, families: list[str], severities: list[float], seeds: list[int]) -> tuple[list[dict], dict]:
    """One row per noisy mask: scene, family, severity, seed, concept, true IoU, shape terms,
    image evidence; and CPU timings of the scoring (not of the noise)."""
    rows: list[dict] = []
    image_cpu, mask_cpu = [], []
    for name, image, clean in scenes:
        start = time.process_time()
        ev = image_evidence(image)
        image_cpu.append(time.process_time() - start)
        cells = [("clean", 0.0, 0)] if 0 in severities else []
        cells += [(f, s, seed) for f in families for s in severities if s > 0 for seed in seeds]
        for family, severity, seed in cells:
            for k, mask in enumerate(clean):
                others = [o for j, o in enumerate(clean) if j != k]
                noisy = mask if family == "clean" else perturb(mask, family, severity, seed * 1000 + k, others)
                if not noisy.any():
                    continue  # the pipeline scores an empty mask 0 without evidence; nothing to learn
                start = time.process_time()
                feats = shape_features(noisy, others)
                feats.update(mask_evidence(ev, noisy))
                mask_cpu.append(time.process_time() - start)
                union = np.logical_or(noisy, mask).sum()
                rows.append({"scene": name, "family": family, "severity": severity, "seed": seed, "concept": k,
                             "iou": float(np.logical_and(noisy, mask).sum() / union), **feats,
                             "old_quality": shape_score(feats)})
    timing = {"mask_evidence_cpu_ms": round(1000 * float(np.mean(mask_cpu)), 2),
              "image_evidence_cpu_ms": round(1000 * float(np.mean(image_cpu)), 2),
              "image_side_px": int(max(scenes[0][1].shape[:2]))}
    return rows, timing


def time_scoring(scenes, *, repeats: int = 5) -> dict:
    """Milliseconds to score each example photo's own masks as the pipeline does
    (``score_masks``: the image evidence once, then shape terms, evidence and model per
    mask), median over ``repeats`` passes. CPU time of this process (one core's worth:
    another session's load inflates it little) with OpenCV held to one thread, and wall
    time beside it. ``ms_per_mask`` counts each mask's share of its image's work."""
    import cv2

    from breakscene.quality.score import score_masks

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        score_masks(scenes[0][1], scenes[0][2])  # warm: imports, the model file
        image_ms, mask_ms, total_ms, wall_ms = [], [], [], []
        n_masks = sum(len(m) for _, _, m in scenes)
        for _ in range(repeats):
            t_image = t_total = 0.0
            wall = time.perf_counter()
            for _, image, masks in scenes:
                start = time.process_time()
                image_evidence(image)
                t_image += time.process_time() - start
                start = time.process_time()
                score_masks(image, masks)
                t_total += time.process_time() - start
            wall_ms.append(1000 * (time.perf_counter() - wall) / n_masks)
            image_ms.append(1000 * t_image / len(scenes))
            total_ms.append(1000 * t_total / n_masks)
            mask_ms.append(1000 * (t_total - t_image) / n_masks)
    finally:
        cv2.setNumThreads(threads)
    return {"image_side_px": int(max(scenes[0][1].shape[:2])), "masks_per_image": round(n_masks / len(scenes), 2),
            "repeats": repeats, "image_ms": round(float(np.median(image_ms)), 1),
            "mask_ms": round(float(np.median(mask_ms)), 1), "ms_per_mask": round(float(np.median(total_ms)), 1),
            "ms_per_mask_wall": round(float(np.median(wall_ms)), 1)}


def _matrix(rows: list[dict]) -> np.ndarray:
    return np.array([[r[k] for k in MODEL_FEATURES] for r in rows], np.float64)


def leave_one_scene_out(rows: list[dict]) -> np.ndarray:
    """Each row's prediction by a model fitted on the other scenes only."""
    scenes = np.array([r["scene"] for r in rows])
    x, y = _matrix(rows), np.array([r["iou"] for r in rows])
    pred = np.zeros(len(rows))
    for scene in np.unique(scenes):
        held = scenes == scene
        model = fit_model(x[~held], y[~held], MODEL_FEATURES, version="loso", alpha=RIDGE_ALPHA)
        pred[held] = model.predict_rows(x[held])
    return pred


def rank_metrics(score: np.ndarray, iou: np.ndarray) -> dict:
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    out = {"n": int(len(iou)), "spearman": None, "auc_good_vs_bad": None}
    if len(iou) > 2 and np.ptp(iou) > 0 and np.ptp(score) > 0:
        out["spearman"] = round(float(spearmanr(score, iou)[0]), 3)
    good, bad = iou >= GOOD, iou < BAD
    if good.any() and bad.any():
        keep = good | bad
        out["auc_good_vs_bad"] = round(float(roc_auc_score(good[keep], score[keep])), 3)
    return out


def evaluate(rows: list[dict], new: np.ndarray) -> dict:
    iou = np.array([r["iou"] for r in rows])
    old = np.array([r["old_quality"] for r in rows])
    fams = np.array([r["family"] for r in rows])
    out = {"overall": {"old": rank_metrics(old, iou), "new": rank_metrics(new, iou)}, "per_family": {}}
    for fam in [f for f in FAMILIES if f in set(fams)]:
        sel = fams == fam
        out["per_family"][fam] = {"old": rank_metrics(old[sel], iou[sel]), "new": rank_metrics(new[sel], iou[sel])}
    out["mean_abs_error_new"] = round(float(np.abs(new - iou).mean()), 3)
    return out


def run_quality(*, root: Path, families: list[str], severities: list[float], seeds: list[int],
                fit: bool = False, model_path: Path = MODEL_PATH) -> dict:
    # 1. noisy masks of every scene, with their evidence
    scenes = load_example_scenes(root)
    rows, timing = noisy_rows(scenes, families, severities, seeds)
    # 2. leave-one-scene-out predictions, old score beside new
    pred = leave_one_scene_out(rows)
    result = {"scenes": [s[0] for s in scenes], "clean_masks": sum(len(s[2]) for s in scenes),
              "noisy_masks": len(rows), "families": families, "severities": severities, "seeds": seeds,
              "model_features": MODEL_FEATURES, "leave_one_scene_out": evaluate(rows, pred)}
    # 3. the model fitted on every scene: timed one mask at a time, as the pipeline predicts
    x, y = _matrix(rows), np.array([r["iou"] for r in rows])
    info = {"fitted_on": {k: result[k] for k in ("scenes", "clean_masks", "noisy_masks", "families",
                                                  "severities", "seeds")},
            "target": "IoU of the noisy mask with its clean mask", "ridge_alpha": RIDGE_ALPHA,
            "refit": "python -m benchmarks quality --fit",
            "leave_one_scene_out": result["leave_one_scene_out"]["overall"]["new"]}
    model = fit_model(x, y, MODEL_FEATURES, version=MODEL_VERSION, alpha=RIDGE_ALPHA, info=info)
    start = time.process_time()
    for r in rows:
        model.predict(r)
    timing["model_cpu_ms"] = round(1000 * (time.process_time() - start) / len(rows), 3)
    # the target's number: the example photos' own masks, each with its share of the image's work
    timing["scoring"] = time_scoring(scenes)
    timing["seconds_per_mask"] = round(timing["scoring"]["ms_per_mask"] / 1000, 4)
    result["timing"] = timing
    if fit:  # 4. ship it
        model_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = model_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(model.to_dict(), indent=1) + "\n")
        tmp.replace(model_path)  # atomic: a reader never sees half a model
        result["wrote_model"] = str(model_path)
    return result
