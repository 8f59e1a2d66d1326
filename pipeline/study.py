"""The noisy-mask robustness study as a Ray job.

1. Scenes with clean masks (groundtruth.py) x axes (any ExtractConfig field) x noise:
   one clean cell, then family x severity (> 0) x seed, then real segmenters' masks.
2. Print the grid size and its estimated GPU-hours; leave out cells already done.
3. Ray Data: a ``StudyWorker`` actor per GPU perturbs the masks, extracts, and measures
   against the clean masks (breakscene.evaluation); each cell is committed as
   OUT/cells/<cell_id>.json (the done-marker) with its measurement rows.
4. OUT/measurements/part-0.parquet is rebuilt from every cell file.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import time
from dataclasses import asdict
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pandas as pd
from pydantic import Field, field_validator, model_validator

from breakscene.config import ExtractConfig, StrictModel
from breakscene.evaluation import EvalConfig
from breakscene.noise import FAMILIES, boundary_f_score, match_masks, perturb
from breakscene.storage import exists, filesystem, join, write_bytes

from .config import ModelConfig, ResourcesConfig, SegmenterConfig, StorageConfig
from .groundtruth import SceneSources, StudyScene, collect_scenes, load_clean

CLEAN = "clean"


class NoiseGrid(StrictModel):
    families: list[str] = Field(default_factory=lambda: list(FAMILIES))
    severities: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    seeds: list[int] = Field(default_factory=lambda: [0])
    segmenters: list[str] = Field(default_factory=list)  # real segmenter noise: classical, sam, tiny-sam

    @field_validator("families")
    @classmethod
    def _families(cls, v):
        unknown = [f for f in v if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown noise families {unknown}; known: {', '.join(FAMILIES)}")
        return v

    @field_validator("severities")
    @classmethod
    def _severities(cls, v):
        if any(not 0 < s <= 1 for s in v):
            raise ValueError("severities must be in (0, 1]; the clean cell (severity 0) is always included")
        return v


class StudyConfig(StrictModel):
    kind: Literal["study"]
    name: str = "robustness"
    output: str
    scenes: SceneSources = Field(default_factory=SceneSources)
    noise: NoiseGrid = Field(default_factory=NoiseGrid)
    axes: dict[str, list] = Field(default_factory=dict)  # ExtractConfig field -> values
    model: ModelConfig = Field(default_factory=ModelConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    evaluation: EvalConfig = Field(default_factory=EvalConfig)
    segmenter: SegmenterConfig = Field(default_factory=lambda: SegmenterConfig(kind="classical"))
    storage: StorageConfig = Field(default_factory=StorageConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    seconds_per_step: float | None = Field(None, gt=0)  # for the estimate when no cell is done yet
    runtime_env: dict = Field(default_factory=dict)

    @model_validator(mode="after")
    def _axes(self) -> "StudyConfig":
        for combo in axis_combos(self.axes):  # every combination must be a valid ExtractConfig
            ExtractConfig.model_validate({**self.extract.model_dump(), **combo})
        return self


def axis_combos(axes: dict[str, list]) -> list[dict]:
    keys = sorted(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))] or [{}]


def cell_id(cfg: StudyConfig, scene_id: str, family: str, severity: float, seed: int, axis: dict) -> str:
    payload = json.dumps([scene_id, family, severity, seed, axis, cfg.model.model_dump(),
                          cfg.extract.model_dump(mode="json"), cfg.evaluation.model_dump()], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def build_cells(cfg: StudyConfig, scenes: list[StudyScene]) -> list[dict]:
    cells = []
    for scene, axis in itertools.product(scenes, axis_combos(cfg.axes)):
        noise = [(CLEAN, 0.0, 0)]
        noise += [(f, s, seed) for f in cfg.noise.families for s in cfg.noise.severities for seed in cfg.noise.seeds]
        noise += [(f"segmenter:{name}", float("nan"), 0) for name in cfg.noise.segmenters]
        for family, severity, seed in noise:
            cells.append({"cell_id": cell_id(cfg, scene.scene_id, family, severity, seed, axis),
                          "scene": json.dumps(asdict(scene)), "family": family, "severity": severity, "seed": seed,
                          "axis": json.dumps(axis, sort_keys=True)})
    return cells


def cell_uri(out: str, cid: str) -> str:
    return join(out, "cells", f"{cid}.json")


def read_cells(out: str) -> dict[str, dict]:
    fs, root = filesystem(join(out, "cells"))
    if not fs.exists(root):
        return {}
    paths = [p for p in fs.ls(root, detail=False) if p.endswith(".json")]
    return {json.loads(v)["cell_id"]: json.loads(v) for v in (fs.cat(paths).values() if paths else [])}


class StudyWorker:
    """Models (diffusion + embedders) loaded once; one cell per call."""

    def __init__(self, study: dict, threads: int | None = None) -> None:
        import torch

        from breakscene.embedders import build_embedder
        from breakscene.extractor import Extractor

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
        self._segmenters: dict = {}

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
            write_bytes(uri, json.dumps(result).encode())
            out.append({"cell_id": cell["cell_id"], "status": result["status"], "seconds": result["seconds"]})
        return pd.DataFrame(out)

    def _segment(self, name: str, image: np.ndarray) -> list[np.ndarray]:
        if name not in self._segmenters:
            from .segmenters import build_segmenter

            self._segmenters[name] = build_segmenter(self.cfg.segmenter.model_copy(update={"kind": name}))
        return [m["mask"] for m in self._segmenters[name](image)]

    def run_cell(self, cell: dict) -> dict:
        from breakscene.errors import BreakSceneError
        from breakscene.evaluation import Evaluator
        from breakscene.masks import iou
        from breakscene.quality import score_masks
        from breakscene.scene import build_scene, decode_image

        scene = StudyScene(**json.loads(cell["scene"]))
        axis = json.loads(cell["axis"])
        base = {"cell_id": cell["cell_id"], "scene_id": scene.scene_id, "family": cell["family"],
                "severity": cell["severity"], "seed": int(cell["seed"]), "config": cell["axis"],
                **{f"axis_{k}": str(v) for k, v in axis.items()}}
        try:
            image_bytes, clean = load_clean(scene)
            if not all(m.any() for m in clean):
                raise BreakSceneError(f"scene {scene.scene_id}: a clean mask is empty")
            family = cell["family"]
            if family == CLEAN:
                noisy = [m.copy() for m in clean]
            elif family.startswith("segmenter:"):
                image = np.asarray(decode_image(image_bytes, scene.scene_id))
                found = self._segment(family.split(":", 1)[1], image)
                match = match_masks(found, list(clean))
                noisy = [found[j] if j is not None else np.zeros_like(clean[0]) for j in match]
            else:
                noisy = [perturb(m, family, float(cell["severity"]), int(cell["seed"]) * 1000 + k,
                                 [o for j, o in enumerate(clean) if j != k]) for k, m in enumerate(clean)]
            # the pipeline's score, blind to the clean mask, beside the truth it tries to predict
            predicted = score_masks(np.asarray(decode_image(image_bytes, scene.scene_id)), noisy)
            quality = [{"mask_iou": iou(n, c), "mask_boundary_f": boundary_f_score(n, c),
                        "predicted_quality": p["quality"], "quality_version": p["quality_version"]}
                       for n, c, p in zip(noisy, clean, predicted)]
            empty = [k for k, m in enumerate(noisy) if not m.any()]
            if empty:
                reason = f"the noisy mask of concept {empty[0]} is empty"
                return {"cell_id": cell["cell_id"], "status": "skipped", "reason": reason,
                        "rows": [{**base, **q, "concept_index": k, "status": "skipped", "reason": reason}
                                 for k, q in enumerate(quality)]}
            built = build_scene(image_bytes, scene.scene_id, [(f"mask{k}", m) for k, m in enumerate(noisy)],
                                self.cfg.extract.max_concepts)
            extract_cfg = ExtractConfig.model_validate({**self.cfg.extract.model_dump(), **axis})
            evaluator = Evaluator(clean, scene.labels, self.cfg.evaluation, self.identity, self.prompt)
            bundle = join(self.cfg.output, "bundles", cell["cell_id"])
            result = self.extractor.extract(built, extract_cfg, out=bundle, evaluate=evaluator)
        except (BreakSceneError, ValueError) as exc:
            return {"cell_id": cell["cell_id"], "status": "skipped", "reason": str(exc),
                    "rows": [{**base, "concept_index": -1, "status": "skipped", "reason": str(exc)}]}
        rows = [{**base, **quality[k], "concept_index": k, "status": "ok", "reason": "", **metrics,
                 "bundle_uri": bundle, "grid_uri": result.grid_uri or "",
                 "train_seconds": result.timings["phase1"] + result.timings["phase2"],
                 "train_steps": extract_cfg.phase1_steps + extract_cfg.phase2_steps}
                for k, metrics in enumerate(result.evaluation["concepts"])]
        return {"cell_id": cell["cell_id"], "status": "ok", "reason": "", "rows": rows}


MEASUREMENT_COLUMNS = ["cell_id", "scene_id", "concept_index", "family", "severity", "seed", "config", "status",
                       "reason", "mask_iou", "mask_boundary_f", "predicted_quality", "quality_version", "attention_iou", "attention_leak", "assigned_correct",
                       "recon_in", "recon_out", "identity_sim", "prompt_sim", "bundle_uri", "grid_uri",
                       "train_seconds", "train_steps"]


def write_measurements(out: str, cells: dict[str, dict]) -> int:
    rows = [r for c in cells.values() for r in c["rows"]]
    if not rows:
        return 0
    df = pd.DataFrame(rows)
    for col in MEASUREMENT_COLUMNS:
        if col not in df:
            df[col] = None
    axis_cols = sorted(c for c in df.columns if c.startswith("axis_"))
    df = df[MEASUREMENT_COLUMNS + axis_cols].sort_values(["scene_id", "family", "severity", "seed", "concept_index"])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    write_bytes(join(out, "measurements", "part-0.parquet"), buf.getvalue())
    return len(df)


def estimate_gpu_hours(cfg: StudyConfig, n_cells: int, done: dict[str, dict]) -> tuple[float, str]:
    """From cells already measured here, else a calibration run of the model, else the
    job's ``seconds_per_step``."""
    steps = cfg.extract.phase1_steps + cfg.extract.phase2_steps
    measured = [r["train_seconds"] / r["train_steps"] for c in done.values() for r in c["rows"][:1]
                if r.get("train_steps")]
    if measured:
        per_step, source = float(np.mean(measured)), f"measured on {len(measured)} finished cells"
    elif cfg.seconds_per_step:
        per_step, source = cfg.seconds_per_step, "the job's seconds_per_step"
    else:
        per_step, source = calibrate(cfg), "a calibration run on this machine"
    overhead = 1.5  # diagnostic, evaluation and bundle, measured at roughly half the training time
    return n_cells * steps * per_step * overhead / 3600, source


def calibrate(cfg: StudyConfig) -> float:
    from breakscene.extractor import Extractor
    from breakscene.scene import build_scene

    from .demo import generated_scene

    image, masks = generated_scene(0, 128)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(image).save(buf, format="PNG")
    ex = Extractor(cfg.model.id, cfg.model.revision, runtime=cfg.model.runtime, progress=False)
    scene = build_scene(buf.getvalue(), "calibration", [(f"m{i}", m) for i, m in enumerate(masks)], 4)
    probe = cfg.extract.model_copy(update={"phase1_steps": 3, "phase2_steps": 3, "grid_seeds": 0,
                                           "prior": cfg.extract.prior.model_copy(update={"enabled": False})})
    result = ex.extract(scene, probe)
    return (result.timings["phase1"] + result.timings["phase2"]) / 6


def run_study(cfg: StudyConfig, address: str | None = None) -> dict:
    from .run import _init_ray

    cfg.storage.apply()
    started = time.perf_counter()
    scenes = collect_scenes(cfg.scenes)
    if not scenes:
        raise ValueError("the study has no scene: set scenes.generated, scenes.manifest or scenes.coco")
    cells = build_cells(cfg, scenes)
    done = read_cells(cfg.output)
    todo = [c for c in cells if c["cell_id"] not in done]
    hours, source = estimate_gpu_hours(cfg, len(todo), done)
    print(f"study {cfg.name}: {len(scenes)} scenes x {len(axis_combos(cfg.axes))} axis settings -> "
          f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run; "
          f"estimated {hours:.3f} GPU-hours ({source})", flush=True)
    statuses: list[dict] = []
    if todo:
        ray = _init_ray(cfg, address)
        from ray.data import ActorPoolStrategy

        gpus = ray.cluster_resources().get("GPU", 0)
        per_actor = cfg.resources.extract_gpus if cfg.resources.extract_gpus is not None else (1.0 if gpus >= 1 else 0)
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map_batches(StudyWorker, batch_size=1, batch_format="pandas", num_cpus=1, num_gpus=per_actor,
                            compute=ActorPoolStrategy(min_size=1, max_size=cfg.resources.extract_actors),
                            fn_constructor_kwargs={"study": cfg.model_dump(mode="json"),
                                                   "threads": None if gpus else cfg.resources.num_cpus})
        statuses = list(ds.iter_rows())
    all_cells = read_cells(cfg.output)
    n_rows = write_measurements(cfg.output, all_cells)
    summary = {"study": cfg.name, "cells": len(cells), "ran": sum(s["status"] != "resumed" for s in statuses),
               "resumed": len(cells) - len(todo) + sum(s["status"] == "resumed" for s in statuses),
               "skipped": sum(c["status"] == "skipped" for c in all_cells.values()),
               "measurement_rows": n_rows, "estimated_gpu_hours": round(hours, 4), "estimate_source": source,
               "seconds": round(time.perf_counter() - started, 3)}
    write_bytes(join(cfg.output, "study.json"), json.dumps(summary, indent=2).encode())
    return summary
