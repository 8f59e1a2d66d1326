"""The driver: manifest in, Ray Data stages, tables and summary out.

1. Read and validate the manifest (driver side: errors before any work).
2. Leave out images already done (their records say ok / skipped) unless ``force``.
3. Stream the rest through load -> segment -> score/select -> extract on Ray Data.
4. Rebuild the Parquet tables from all records; write the run summary.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid

from breakscene.storage import configure, filesystem, join, remove, write_bytes

from . import records as R
from .config import JobConfig
from .demo import build_demo_inputs
from .manifest import read_manifest
from .stages import ContentClaims, Extract, Segment, initial_row, load_images, score_and_select

log = logging.getLogger(__name__)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def split_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows whose explicit image_id repeats an earlier row's are rejected, not processed."""
    seen: dict[str, int] = {}
    keep, rejected = [], []
    for row in rows:
        image_id = row["image_id"]
        if image_id is not None and image_id in seen:
            rejected.append({"image_id": image_id, "image_uri": row["image_uri"], "manifest_row": row["manifest_row"],
                             "status": "failed", "width": 0, "height": 0, "warnings": [], "n_masks": 0,
                             "n_concepts": 0, "bundle_uri": "", "mask_source": "",
                             "error": f"manifest: duplicate image_id {image_id!r} (first at row {seen[image_id]})"})
            continue
        if image_id is not None:
            seen[image_id] = row["manifest_row"]
        keep.append(row)
    return keep, rejected


def cleanup_partial(out: str) -> int:
    """Remove bundles left half-written by a killed run: local temporary folders, and
    remote bundle prefixes without their bundle.json."""
    fs, root = filesystem(join(out, "bundles"))
    if not fs.exists(root):
        return 0
    removed = 0
    for path in fs.ls(root, detail=False):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if ".tmp-" in name or not fs.exists(f"{path.rstrip('/')}/bundle.json"):
            fs.rm(path, recursive=True)
            removed += 1
    return removed


def _init_ray(job: JobConfig, address: str | None):
    import ray

    if ray.is_initialized():
        return ray
    if address:
        ray.init(address=address, log_to_driver=True)
    else:  # inside `ray job submit` RAY_ADDRESS is set and init() joins that cluster
        import os

        if os.environ.get("RAY_ADDRESS"):
            ray.init()
        else:
            # "local": a new embedded cluster even when another one runs on this machine.
            ray.init(address="local", num_cpus=job.resources.num_cpus, num_gpus=job.resources.num_gpus,
                     include_dashboard=False)
    return ray


def run_job(job: JobConfig, address: str | None = None) -> dict:
    configure(job.storage.options)
    started = time.perf_counter()
    run_id = new_run_id()
    out = job.output
    # 1. manifest
    manifest = job.manifest or build_demo_inputs(job.demo_inputs, out)
    rows, rejected = split_duplicates(read_manifest(manifest))
    # 2. resume
    removed = cleanup_partial(out)
    done = set() if job.force else R.done_ids(out)
    todo = [r for r in rows if r["image_id"] is None or r["image_id"] not in done]
    print(f"run {run_id}: {len(rows) + len(rejected)} manifest rows, {len(rows) - len(todo)} already done, "
          f"{len(todo)} to process, {len(rejected)} rejected" + (f", {removed} partial bundles removed" if removed else ""),
          flush=True)
    # 3. stages
    results: list[dict] = []
    if todo:
        ray = _init_ray(job, address)
        results = _run_stages(ray, job, todo, run_id)
    # 4. tables and summary
    records = R.read_records(out)
    counts = R.write_tables(out, list(records.values()), rejected)
    summary = _summary(run_id, job, manifest, results, rejected, len(rows) - len(todo), counts,
                       time.perf_counter() - started)
    data = json.dumps(summary, indent=2).encode()
    write_bytes(join(out, "runs", f"{run_id}.json"), data)
    write_bytes(join(out, "summary.json"), data)
    return summary


def _run_stages(ray, job: JobConfig, todo: list[dict], run_id: str) -> list[dict]:
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0)
    has_gpu = gpus > 0
    res = job.resources
    seg_gpus, ext_gpus = auto_gpus(gpus, res)
    job_dict = job.model_dump(mode="json")
    ds = ray.data.from_items([initial_row(r) for r in todo], override_num_blocks=len(todo))
    claims = ray.remote(num_cpus=0)(ContentClaims).remote()
    ds = ds.map_batches(load_images, batch_size=1, batch_format="pandas", num_cpus=0.25,
                        fn_kwargs={"storage": job.storage.options, "claims": claims})
    # several images per Segment call: SAM encodes them in one batched forward
    seg_batch = job.segmenter.image_batch if job.segmenter.kind in ("sam", "tiny-sam") else 1
    ds = ds.map_batches(Segment, batch_size=seg_batch, batch_format="pandas", num_cpus=0.5, num_gpus=seg_gpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=res.segment_actors),
                        fn_constructor_kwargs={"job": job_dict})
    ds = ds.map_batches(score_and_select, batch_size=1, batch_format="pandas", num_cpus=0.25,
                        fn_kwargs={"job": job_dict})
    ds = ds.map_batches(Extract, batch_size=1, batch_format="pandas", num_cpus=1, num_gpus=ext_gpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=res.extract_actors),
                        fn_constructor_kwargs={"job": job_dict, "run_id": run_id,
                                               "threads": None if has_gpu else res.num_cpus})
    return [dict(r) for r in ds.select_columns(["image_id", "manifest_row", "status", "error", "timings"]).iter_rows()]


def auto_gpus(gpus: float, res) -> tuple[float, float]:
    """GPUs per segment and extract actor. Unset values ask for GPUs only when the cluster
    has them, and segmentation shares a GPU only when every actor still fits."""
    ext = res.extract_gpus if res.extract_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if res.segment_gpus is not None:
        return res.segment_gpus, ext
    spare = gpus - ext * res.extract_actors
    return (0.25 if spare >= 0.25 * res.segment_actors else 0.0), ext


def _summary(run_id, job, manifest, results, rejected, pre_done, counts, seconds) -> dict:
    statuses = [r["status"] for r in results]
    per_stage: dict[str, float] = {}
    for r in results:
        for stage, sec in json.loads(r["timings"] or "{}").items():
            per_stage[stage] = round(per_stage.get(stage, 0.0) + sec, 3)
    extracted = statuses.count("ok")
    return {
        "run_id": run_id, "job": job.name, "manifest": manifest, "output": job.output,
        "counts": {"ok": extracted, "failed": statuses.count("failed") + len(rejected),
                   "skipped": statuses.count("skipped"), "resumed": statuses.count("resumed") + pre_done,
                   "duplicate": statuses.count("duplicate")},
        "duplicates": [{"manifest_row": int(r["manifest_row"]), "image_id": r["image_id"], "note": r["error"]}
                       for r in results if r["status"] == "duplicate"],
        "errors": [{"image_id": r["image_id"], "error": r["error"]} for r in results if r["status"] == "failed"]
        + [{"image_id": r["image_id"], "error": r["error"]} for r in rejected],
        "seconds": round(seconds, 3), "seconds_per_stage": per_stage,
        "images_per_hour": round(extracted / seconds * 3600, 2) if seconds > 0 else 0.0,
        "tables": counts,
    }


def remove_outputs(out: str) -> None:
    for name in ("records", "bundles", "images", "masks", "concepts", "summary.json"):
        remove(join(out, name))
