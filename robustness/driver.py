"""The noisy-mask robustness study as a Ray job (``breakscene run`` on a ``kind: study``
job file).

1. Scenes with clean masks (groundtruth.py) x axes x noise -> cells (grid.py).
2. Print the grid size and its estimated GPU-hours; leave out cells already done.
3. Ray Data: a ``StudyWorker`` actor per GPU (workers.py) measures each cell and commits
   it as OUT/cells/<cell_id>.json, the done-marker.
4. OUT/measurements/part-0.parquet is rebuilt from every cell file (cells.py); the
   summary goes to OUT/study.json.
"""
from __future__ import annotations

import time

import numpy as np

from breakscene.errors import BreakSceneError
from breakscene.files.storage import join
from batchjob.artifacts import write_json
from batchjob.cluster import auto_gpus, init_ray
from batchjob.lease import Lease
from batchjob.preflight import check_model, check_output_folder, claim_output_folder

from robustness.cells import read_cells, write_measurements
from robustness.grid import StudyConfig, axis_combos, build_cells
from robustness.groundtruth import collect_scenes
from robustness.workers import StudyWorker

OVERHEAD = 1.5  # diagnostic, evaluation and bundle, measured at roughly half the training time


def estimate_gpu_hours(cfg: StudyConfig, n_cells: int, done: dict[str, dict]) -> tuple[float, str]:
    """From cells already measured here, else the job's ``seconds_per_step``, else a
    calibration run of the model on this machine."""
    steps = cfg.extract.phase1_steps + cfg.extract.phase2_steps
    measured = [r["train_seconds"] / r["train_steps"] for c in done.values() for r in c["rows"][:1]
                if r.get("train_steps")]
    if measured:
        per_step, source = float(np.mean(measured)), f"measured on {len(measured)} finished cells"
    elif cfg.seconds_per_step:
        per_step, source = cfg.seconds_per_step, "the job's seconds_per_step"
    else:
        per_step, source = calibrate(cfg), "a calibration run on this machine"
    return n_cells * steps * per_step * OVERHEAD / 3600, source


def calibrate(cfg: StudyConfig) -> float:
    """Seconds per training step of the study's model: three steps of each phase on a
    generated scene, no prior, no grid."""
    from breakscene.extraction.extractor import Extractor
    from breakscene.scenes.scene import build_scene
    from breakscene.scenes.synthetic import generated_scene, png_bytes

    ex = Extractor(cfg.model.id, cfg.model.revision, runtime=cfg.model.runtime, progress=False)
    image, masks = generated_scene(0, 128)
    n = min(len(masks), cfg.extract.max_concepts)  # no more shapes than the study's scenes may have
    scene = build_scene(png_bytes(image), "calibration", [(f"m{i}", m) for i, m in enumerate(masks[:n])], n)
    probe = cfg.extract.model_copy(update={"phase1_steps": 3, "phase2_steps": 3, "grid_seeds": 0,
                                           "prior": cfg.extract.prior.model_copy(update={"enabled": False})})
    result = ex.extract(scene, probe)
    return (result.timings["phase1"] + result.timings["phase2"]) / 6


def measure(cfg: StudyConfig, todo: list[dict], address: str | None) -> list[dict]:
    """Each cell of ``todo`` through a pool of StudyWorker actors; their status rows."""
    ray = init_ray(cfg.resources, address)
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0)
    _, per_actor = auto_gpus(gpus, cfg.resources)  # the extraction driver's rule for its Extract actors
    ds = ray.data.from_items(todo, override_num_blocks=len(todo))
    ds = ds.map_batches(StudyWorker, batch_size=1, batch_format="pandas", num_cpus=1, num_gpus=per_actor,
                        compute=ActorPoolStrategy(min_size=1, max_size=cfg.resources.extract_actors),
                        fn_constructor_kwargs={"study": cfg.model_dump(mode="json"),
                                               "threads": None if gpus else cfg.resources.num_cpus})
    return list(ds.iter_rows())


def run_study(cfg: StudyConfig, address: str | None = None) -> dict:
    cfg.storage.apply()
    check_output_folder(cfg.output, "study")  # never into a folder of someone else's files
    check_model(cfg.model)  # a broken model folder: one error, before the scenes are read
    started = time.perf_counter()
    scenes = collect_scenes(cfg.scenes)
    if not scenes:
        raise BreakSceneError("the study found no scene in its sources (an empty manifest, or no COCO image "
                              "passing the scene filter): nothing to measure")
    cells = build_cells(cfg, scenes)
    claim_output_folder(cfg.output, "study")
    with Lease(cfg.output, f"study {cfg.name}"):  # one study at a time per output
        done = read_cells(cfg.output)
        todo = [c for c in cells if c["cell_id"] not in done]
        hours, source = estimate_gpu_hours(cfg, len(todo), done)
        print(f"study {cfg.name}: {len(scenes)} scenes x {len(axis_combos(cfg.axes))} axis settings -> "
              f"{len(cells)} cells, {len(cells) - len(todo)} done, {len(todo)} to run; "
              f"estimated {hours:.3f} GPU-hours ({source})", flush=True)
        statuses = measure(cfg, todo, address) if todo else []
        all_cells = read_cells(cfg.output)
        n_rows = write_measurements(cfg.output, all_cells)
        summary = {"study": cfg.name, "cells": len(cells),
                   "ran": sum(s["status"] != "resumed" for s in statuses),
                   "resumed": len(cells) - len(todo) + sum(s["status"] == "resumed" for s in statuses),
                   "skipped": sum(c["status"] == "skipped" for c in all_cells.values()),
                   "measurement_rows": n_rows, "estimated_gpu_hours": round(hours, 4), "estimate_source": source,
                   "seconds": round(time.perf_counter() - started, 3)}
        write_json(join(cfg.output, "study.json"), summary, indent=2)
    return summary
