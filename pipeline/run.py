"""The driver: manifest in, Ray Data stages, Delta tables and summary out.

Nothing here grows with the output's history except one scan of two columns of the
``images`` table (the done set, an Arrow column of ids):
1. Take the output's lease (one run at a time); list the manifest's shards and check
   their header (errors before any work).
2. Done set: ids whose current ``images`` row needs no more work (unless ``force``).
3. Ray Data reads the manifest shards, drops rows already done, and streams the rest
   through load -> segment -> score/select -> extract (or stops after score); each
   batch's table rows are staged as Parquet by the workers.
4. One Delta commit per table; the summary is folded from the stream's small rows.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from breakscene.storage import PARTIAL, filesystem, join, remove, write_bytes

from . import manifest as MF
from . import records as R
from . import tables as T
from .config import JobConfig
from .demo import build_demo_inputs
from .keys import id_problem
from .lease import Lease
from .preflight import check_job
from .resources import fit_plan, stage_plan
from .staging import SUMMARY_SCHEMA, Tally, finish_scored, skip_done, stage_tables
from .stages import ContentClaims, Extract, Segment, load_images, score_and_select

log = logging.getLogger(__name__)
ROWS_PER_BLOCK = 512  # at most, per Ray Data block through the cheap stages (at least 8 blocks)
EXTRACT_ROWS_PER_BLOCK = 16  # at most, per block into extraction (seconds per image)


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def split_duplicates(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows whose explicit image_id repeats an earlier row's, or is refused
    (``keys.id_problem``), are rejected, not processed. (The run itself applies the same
    rules while Ray Data reads the manifest: ``manifest.read_shard``.)"""
    seen: dict[str, int] = {}
    keep, rejected = [], []
    for row in rows:
        image_id = row["image_id"]
        problem = id_problem(image_id) if image_id is not None else None
        if problem is None and image_id is not None and image_id in seen:
            problem = f"duplicate image_id {image_id!r} (first at row {seen[image_id]})"
        if problem:
            rejected.append({"image_id": image_id, "image_uri": row["image_uri"], "manifest_row": row["manifest_row"],
                             "status": "failed", "width": 0, "height": 0, "warnings": [], "n_masks": 0,
                             "n_concepts": 0, "bundle_uri": "", "mask_source": "", "error": f"manifest: {problem}"})
            continue
        if image_id is not None:
            seen[image_id] = row["manifest_row"]
        keep.append(row)
    return keep, rejected


def cleanup_partial(out: str) -> int:
    """``breakscene gc``: remove bundles left half-written by killed runs (local temporary
    folders, prefixes still holding the in-progress marker ``storage.PARTIAL``) and staging
    areas of runs that never committed. A folder with neither that marker nor a
    bundle.json was not written by this project and stays. Checks every bundle, so runs
    never call it: a run clears only the leftovers of the images it processes
    (``records.clear_partial_bundle``)."""
    removed = T.clear_staging(out)
    fs, root = filesystem(join(out, "bundles"))
    if not fs.exists(root):
        return removed
    for path in fs.ls(root, detail=False):
        path = path.rstrip("/")
        name = path.rsplit("/", 1)[-1]
        temporary = name.startswith(".") and ".tmp-" in name
        if temporary or (fs.exists(f"{path}/{PARTIAL}") and not fs.exists(f"{path}/bundle.json")):
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


@dataclass
class StageFns:
    """The stage functions the plan is built from (the scale benchmark swaps in ones that
    do nothing, to measure the plan's own cost per row)."""

    load: Callable = load_images
    segment: type = Segment
    score: Callable = score_and_select
    extract: type = Extract
    finish: Callable = finish_scored
    stage: Callable = stage_tables


def run_job(job: JobConfig, address: str | None = None, *, stages: StageFns | None = None) -> dict:
    check_job(job)  # storage settings applied; output writable and manifest readable, before any work
    started = time.perf_counter()
    run_id = new_run_id()
    out = job.output
    driver: dict[str, float] = {}
    # 1. lease, manifest shards (their header checked before any work)
    with Lease(out, run_id):
        tick = time.perf_counter()
        uri = job.manifest.uri if job.manifest else build_demo_inputs(job.demo_inputs, out)
        spec = MF.ManifestSpec(uri=uri, columns=dict(job.manifest.columns) if job.manifest else {})
        shards = MF.plan(spec)
        T.clear_staging(out)  # a dead run's uncommitted rows (the lease says none is running)
        # 2. done set: one scan of two columns of the images table
        scan = R.scan_images(out)
        done = pa.array([], pa.string()) if job.force else R.done_ids(out, job.stop_after)
        driver["plan"] = time.perf_counter() - tick
        ray = _init_ray(job, address)
        # 3. manifest rows still to do, read by Ray Data; then the stages
        tick = time.perf_counter()
        todo, manifest_counts = _read_manifest(ray, spec, shards, done, job)
        driver["manifest"] = time.perf_counter() - tick
        n_todo = todo.count()
        print(f"run {run_id}: {manifest_counts['rows']} manifest rows, {manifest_counts['done']} already done, "
              f"{n_todo} to process, {manifest_counts['rejected']} rejected"
              + (f" (stop after {job.stop_after})" if job.stop_after != "extract" else ""), flush=True)
        tally = Tally()
        tick = time.perf_counter()
        if n_todo:
            for batch in _plan(ray, job, todo, run_id, done, stages or StageFns()).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                tally.add(batch)
        driver["stream"] = time.perf_counter() - tick
        # 4. one commit per table
        tick = time.perf_counter()
        counts = T.commit_run(out, run_id, _tables(job), replace_ids=_replaced(out, run_id, scan))
        driver["commit"] = time.perf_counter() - tick
        summary = _summary(run_id, job, uri, tally, manifest_counts, counts, time.perf_counter() - started, driver)
        data = json.dumps(summary, indent=2).encode()
        write_bytes(join(out, "runs", f"{run_id}.json"), data)
        write_bytes(join(out, "summary.json"), data)
    return summary


def _tables(job: JobConfig) -> dict[str, pa.Schema]:
    return R.TABLES if job.stop_after == "extract" else {k: R.TABLES[k] for k in ("images", "masks")}


def _read_manifest(ray, spec: MF.ManifestSpec, shards: list[str], done: pa.Array, job: JobConfig):
    """The rows still to do, materialised in Ray's object store (not on the driver), and
    the manifest's counts."""
    tally = ray.remote(num_cpus=0)(MF.ManifestTally).remote()
    items = ray.data.from_items([{"uri": s} for s in shards], override_num_blocks=len(shards))
    todo = items.map_batches(MF.read_shard, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                             fn_kwargs={"spec": {"uri": spec.uri, "columns": spec.columns}, "done": done,
                                        "tally": tally, "single": len(shards) == 1,
                                        "storage": job.storage.options}).materialize()
    counts = ray.get(tally.result.remote())
    ray.kill(tally)
    return todo, counts


def _plan(ray, job: JobConfig, todo, run_id: str, done: pa.Array, fns: StageFns):
    """The stages on Ray Data: blocks of up to ``ROWS_PER_BLOCK`` rows through the cheap
    stages, smaller ones into extraction (seconds per image: every actor gets work)."""
    from ray.data import ActorPoolStrategy

    gpus = ray.cluster_resources().get("GPU", 0)
    has_gpu = gpus > 0
    res = job.resources
    seg_gpus, ext_gpus = auto_gpus(gpus, res)
    extract = job.stop_after == "extract"
    # checked before any work: a plan larger than the cluster waits forever
    plan, notes = fit_plan(stage_plan(segment_gpus=seg_gpus, extract_gpus=ext_gpus if extract else 0.0,
                                      segment_actors=res.segment_actors,
                                      extract_actors=res.extract_actors if extract else 0, load_cpus=res.load_cpus,
                                      repartition_cpus=1.0),  # Ray Data's repartition tasks take a whole CPU
                           ray.cluster_resources(), autoscaling=res.autoscaling)
    for note in notes:
        print(f"resources: {note}", flush=True)
    job_dict = job.model_dump(mode="json")
    claims = ray.remote(num_cpus=0)(ContentClaims).remote()
    n = todo.count()
    ds = todo.repartition(target_num_rows_per_block=min(ROWS_PER_BLOCK, max(1, n // 8)))
    # several images per load task: fetches are I/O, a batch shares the task's start-up
    ds = ds.map_batches(fns.load, batch_size=8, batch_format="pandas", num_cpus=plan["load"]["num_cpus"],
                        fn_kwargs={"storage": job.storage.options, "claims": claims,
                                   "timeout_s": job.storage.timeout_s, "retries": job.storage.retries})
    ds = ds.map_batches(skip_done, batch_size=None, batch_format="pandas", num_cpus=0.1,
                        fn_kwargs={"done": done if len(done) else None})
    # several images per Segment call: SAM encodes them in one batched forward
    seg_batch = job.segmenter.image_batch if job.segmenter.kind in ("sam", "tiny-sam") else 8
    ds = ds.map_batches(fns.segment, batch_size=seg_batch, batch_format="pandas", num_cpus=plan["segment"]["num_cpus"],
                        num_gpus=seg_gpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=plan["segment"]["actors"]),
                        fn_constructor_kwargs={"job": job_dict})
    ds = ds.map_batches(fns.score, batch_size=8, batch_format="pandas", num_cpus=plan["score"]["num_cpus"],
                        fn_kwargs={"job": job_dict})
    if extract:
        ds = ds.repartition(target_num_rows_per_block=min(EXTRACT_ROWS_PER_BLOCK,
                                                          max(1, n // (4 * res.extract_actors))))
        ds = ds.map_batches(fns.extract, batch_size=1, batch_format="pandas", num_cpus=plan["extract"]["num_cpus"],
                            num_gpus=ext_gpus,
                            compute=ActorPoolStrategy(min_size=1, max_size=plan["extract"]["actors"]),
                            fn_constructor_kwargs={"job": job_dict, "run_id": run_id,
                                                   "threads": None if has_gpu else res.num_cpus})
    else:  # score-only: no extraction stage, so no diffusion model is ever loaded
        ds = ds.map_batches(fns.finish, batch_size=None, batch_format="pandas", num_cpus=0.1,
                            fn_kwargs={"run_id": run_id})
    return ds.map_batches(fns.stage, batch_size=256, batch_format="pandas", num_cpus=0.1,
                          fn_kwargs={"out": job.output, "run_id": run_id, "storage": job.storage.options})


def _replaced(out: str, run_id: str, scan: pa.Table) -> set[str]:
    """Ids this run staged that the images table already holds (a failed image retried,
    a scored one extracted, ``force``): their rows are replaced, the rest appended."""
    if scan.num_rows == 0:
        return set()
    staged = T._staged(out, run_id, "images", R.IMAGES_SCHEMA)
    if staged is None:
        return set()
    ids = staged.to_table(columns=["image_id"]).column("image_id")
    return set(pc.filter(ids, pc.is_in(ids, value_set=scan.column("image_id"))).to_pylist())


def auto_gpus(gpus: float, res) -> tuple[float, float]:
    """GPUs per segment and extract actor. Unset values ask for GPUs only when the cluster
    has them, and segmentation shares a GPU only when every actor still fits."""
    ext = res.extract_gpus if res.extract_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if res.segment_gpus is not None:
        return res.segment_gpus, ext
    spare = gpus - ext * res.extract_actors
    return (0.25 if spare >= 0.25 * res.segment_actors else 0.0), ext


def _summary(run_id, job, manifest, tally: Tally, mcounts: dict, counts, seconds, driver) -> dict:
    c = tally.counts
    rejected = [{"image_id": m["image_id"], "error": m["error"], "manifest_file": m["manifest_file"],
                 "manifest_row": m["manifest_row"]} for m in mcounts["messages"]]
    return {
        "run_id": run_id, "job": job.name, "manifest": manifest, "output": job.output, "stop_after": job.stop_after,
        "counts": {"ok": c["ok"], "failed": c["failed"] + mcounts["rejected"], "skipped": c["skipped"],
                   "resumed": c["resumed"] + mcounts["done"], "duplicate": c["duplicate"],
                   **({"scored": c[R.SCORED]} if job.stop_after == "score" else {})},
        "duplicates": tally.duplicates,
        "errors": tally.errors + rejected,
        "manifest_rows": mcounts["rows"],
        "seconds": round(seconds, 3), "seconds_per_stage": tally.seconds,
        "driver_seconds": {k: round(v, 3) for k, v in driver.items()},
        "images_per_hour": round(c["ok"] / seconds * 3600, 2) if seconds > 0 else 0.0,
        "tables": counts,
    }


def remove_outputs(out: str) -> None:
    for name in ("records", "bundles", "images", "masks", "concepts", "summary.json", T.STAGING):
        remove(join(out, name))


__all__ = ["run_job", "StageFns", "auto_gpus", "cleanup_partial", "new_run_id", "split_duplicates",
           "remove_outputs", "SUMMARY_SCHEMA"]
