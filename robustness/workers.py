"""``StudyWorker``: a Ray Data actor that measures study cells, models (diffusion model,
embedders, segmenters) loaded once per actor. Per cell: the clean masks, their noisy
version (a noise family, or a real segmenter's masks matched to them), the masks' true
and predicted quality, then extraction measured against the clean masks
(``robustness.evaluation``) on the trained weights before their reset. The cell's JSON
(``cells.cell_uri``) is its done-marker."""
from __future__ import annotations

import json
import time

import numpy as np
from pydantic import ValidationError
import pandas as pd

from breakscene.config import ExtractConfig
from breakscene.errors import BreakSceneError
from breakscene.scenes.masks import iou
from breakscene.scenes.noise import boundary_f_score, match_masks, perturb
from breakscene.quality.score import score_masks
from breakscene.scenes.scene import build_scene, decode_image
from breakscene.files.storage import exists, join
from batchjob.artifacts import write_json

from robustness.cells import cell_uri
from robustness.grid import CLEAN, SEGMENTER, StudyConfig
from robustness.groundtruth import StudyScene, load_clean


def perturbed(clean: np.ndarray, family: str, severity: float, seed: int) -> list[np.ndarray]:
    """Each clean mask perturbed by ``family`` at ``severity``; the other masks of the scene
    are given so that a perturbation can grow into its neighbours."""
    return [perturb(m, family, severity, seed * 1000 + k, [o for j, o in enumerate(clean) if j != k])
            for k, m in enumerate(clean)]


def mask_quality(image: np.ndarray, noisy: list[np.ndarray], clean: np.ndarray) -> list[dict]:
    """Per concept: the noisy mask's true IoU and boundary F-score with its clean mask, and
    the pipeline's predicted quality, blind to the clean mask, beside them."""
    predicted = score_masks(image, noisy)
    return [{"mask_iou": iou(n, c), "mask_boundary_f": boundary_f_score(n, c),
             "predicted_quality": p["quality"], "quality_version": p["quality_version"]}
            for n, c, p in zip(noisy, clean, predicted)]


def skipped(cell: dict, base: dict, reason: str, quality: list[dict] | None = None) -> dict:
    """A cell that could not be measured: one row per concept (with the masks' quality when
    known), else one row for the cell."""
    rows = ([{**base, **q, "concept_index": k, "status": "skipped", "reason": reason} for k, q in enumerate(quality)]
            if quality else [{**base, "concept_index": -1, "status": "skipped", "reason": reason}])
    return {"cell_id": cell["cell_id"], "status": "skipped", "reason": reason, "rows": rows}


def cell_base(cell: dict, scene: StudyScene) -> dict:
    """The columns every measurement row of ``cell`` shares."""
    axis = json.loads(cell["axis"])
    return {"cell_id": cell["cell_id"], "scene_id": scene.scene_id, "family": cell["family"],
            "severity": cell["severity"], "seed": int(cell["seed"]), "config": cell["axis"],
            **{f"axis_{k}": str(v) for k, v in axis.items()}}


class StudyWorker:
    """Models (diffusion + embedders) loaded once; one cell per call."""

    def __init__(self, study: dict, threads: int | None = None) -> None:
        import torch

        from robustness.embedders import build_embedder
        from breakscene.extraction.extractor import Extractor

        if threads:
            torch.set_num_threads(threads)
        self.cfg = StudyConfig.model_validate(study)
        self.cfg.storage.apply()
        self.extractor = Extractor(self.cfg.model.id, self.cfg.model.revision, runtime=self.cfg.model.runtime,
                                   max_concepts=self.cfg.extract.max_concepts, progress=False)
        ev = self.cfg.evaluation
        self.identity = build_embedder(ev.identity_embedder) if ev.generation else None
        self.prompt = (self.identity if ev.prompt_embedder == ev.identity_embedder else
                       build_embedder(ev.prompt_embedder)) if ev.generation else None
        self.segmenters: dict = {}  # built on first use, by name

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = []
        for cell in batch.to_dict("records"):
            uri = cell_uri(self.cfg.output, cell["cell_id"])
            if exists(uri):  # done by an earlier run or an earlier attempt of this task
                out.append({"cell_id": cell["cell_id"], "status": "resumed", "seconds": 0.0})
                continue
            start = time.perf_counter()
            result = self.run_cell(cell)
            result["seconds"] = round(time.perf_counter() - start, 3)
            write_json(uri, result)
            out.append({"cell_id": cell["cell_id"], "status": result["status"], "seconds": result["seconds"]})
        return pd.DataFrame(out)

    def segment(self, name: str, image: np.ndarray) -> list[np.ndarray]:
        """The masks segmenter ``name`` finds in ``image``."""
        if name not in self.segmenters:
            from batchjob.segmenters import build_segmenter

            self.segmenters[name] = build_segmenter(self.cfg.segmenter.model_copy(update={"kind": name}))
        return [m["mask"] for m in self.segmenters[name](image)]

    def noisy_masks(self, cell: dict, image: np.ndarray, clean: np.ndarray) -> list[np.ndarray]:
        family = cell["family"]
        if family == CLEAN:
            return [m.copy() for m in clean]
        if family.startswith(SEGMENTER):
            found = self.segment(family.removeprefix(SEGMENTER), image)
            match = match_masks(found, list(clean))
            return [found[j] if j is not None else np.zeros_like(clean[0]) for j in match]
        return perturbed(clean, family, float(cell["severity"]), int(cell["seed"]))

    def run_cell(self, cell: dict) -> dict:
        """The cell's result: status, reason and its measurement rows (one per concept)."""
        scene = StudyScene(**json.loads(cell["scene"]))
        base = cell_base(cell, scene)
        try:
            image_bytes, clean = load_clean(scene)
            if not all(m.any() for m in clean):
                raise BreakSceneError(f"scene {scene.scene_id}: a clean mask is empty")
            image = np.asarray(decode_image(image_bytes, scene.scene_id))
            noisy = self.noisy_masks(cell, image, clean)
            quality = mask_quality(image, noisy, clean)
            empty = [k for k, m in enumerate(noisy) if not m.any()]
            if empty:
                return skipped(cell, base, f"the noisy mask of concept {empty[0]} is empty", quality)
            extract_cfg = ExtractConfig.model_validate({**self.cfg.extract.model_dump(), **json.loads(cell["axis"])})
            bundle = join(self.cfg.output, "bundles", cell["cell_id"])
            result = self.extract(scene, image_bytes, clean, noisy, extract_cfg, bundle)
        except (BreakSceneError, ValidationError) as exc:  # bad input skips the cell; a code error stops the study
            return skipped(cell, base, str(exc))
        rows = [{**base, **quality[k], "concept_index": k, "status": "ok", "reason": "", **metrics,
                 "bundle_uri": bundle, "grid_uri": result.grid_uri or "",
                 "train_seconds": result.timings["phase1"] + result.timings["phase2"],
                 "train_steps": extract_cfg.phase1_steps + extract_cfg.phase2_steps}
                for k, metrics in enumerate(result.evaluation["concepts"])]
        return {"cell_id": cell["cell_id"], "status": "ok", "reason": "", "rows": rows}

    def extract(self, scene: StudyScene, image_bytes: bytes, clean: np.ndarray, noisy: list[np.ndarray],
                cfg: ExtractConfig, bundle: str):
        """Train on the noisy masks; measured against the clean ones before the reset."""
        from robustness.evaluation import Evaluator

        built = build_scene(image_bytes, scene.scene_id, [(f"mask{k}", m) for k, m in enumerate(noisy)],
                            self.cfg.extract.max_concepts)
        evaluator = Evaluator(clean, scene.labels, self.cfg.evaluation, self.identity, self.prompt)
        return self.extractor.extract(built, cfg, out=bundle, evaluate=evaluator)
