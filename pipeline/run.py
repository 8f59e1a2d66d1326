"""The driver: manifest in, Ray Data stages, Delta tables and summary out.

Nothing here grows with the output's history except one scan of two columns of the
``images`` table (the done set, an Arrow column of ids):
1. Take the output's lease (one run at a time); finish the commits of a run killed during
   them; list the manifest's shards and check their header (errors before any work).
2. Done set: ids whose current ``images`` row needs no more work (unless ``force``).
3. Ray Data reads the manifest shards, drops rows already done, and streams the rest
   through load -> segment -> score/select -> extract (or stops after score); each
   batch's table rows are staged as Parquet by the workers.
4. The commits as one unit (``pipeline/intent.py``): the intent, one Delta commit per
   table, the summary folded from the stream's small rows; a killed driver's commits are
   finished by the next run (step 1).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import re
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.compute as pc

from breakscene.errors import OUTPUT_FAULT_ERRNOS, OutputWriteError, output_fault
from breakscene.files.storage import PARTIAL, exists, filesystem, join

from batchjob.manifest import ManifestSpec, plan
from pipeline.shards import ManifestTally, read_shard
from pipeline.records import TABLES, done_ids, scan_images
from pipeline.tables import clear_staging
from batchjob.cluster import auto_gpus, init_ray
from pipeline.config import JobConfig
from pipeline.demo import build_demo_inputs
from pipeline.shards import DoneSet
from pipeline.intent import commit_run, intent_uri, pending, roll_forward
from batchjob.lease import Lease, read_lease
from batchjob.preflight import claim_output_folder
from pipeline.tables import check_job
from batchjob.cluster import fit_plan, stage_plan
from pipeline.staging import SUMMARY_SCHEMA, Tally, finish_scored, skip_done, stage_tables
from pipeline.stages import ContentClaims, Extract, Segment, load_images, score_and_select
from pipeline.config import ExtractSettings, SegmentSettings, SelectSettings
from pipeline.groups import ExtractGroup, cap_group
from pipeline.records import Status

log = logging.getLogger(__name__)
ROWS_PER_BLOCK = 512  # at most, per Ray Data block through the cheap stages (at least 8 blocks)
EXTRACT_ROWS_PER_BLOCK = 16  # at most, per block into extraction (seconds per image)
# Arrow batches into every stage: a pandas batch costs a conversion each way per call
# (12 ms per row at the extract stage's one-row batches; see pipeline/row.py)
FORMAT = "pyarrow"


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def cleanup_partial(out: str) -> int:
    """``breakscene gc``: remove bundles left half-written by killed runs (local temporary
    folders, prefixes still holding the in-progress marker ``storage.PARTIAL``) and staging
    areas of runs that never committed. A folder with neither that marker nor a
    bundle.json was not written by this project and stays. Checks every bundle, so runs
    never call it: a run clears only the leftovers of the images it processes
    (``records.clear_partial_bundle``)."""
    removed = clear_staging(out, keep={i["run_id"] for i in pending(out)})
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


@contextlib.contextmanager
def stop_on_output_faults(out: str, run_id: str):
    """Claim the output, then run the block; a full or read-only output anywhere in it (the
    driver's writes, or a worker's record or staged rows) stops the run with one
    ``OutputWriteError`` (exit status 4) instead of a traceback through Ray."""
    try:
        claim_output_folder(out, "pipeline")
        yield
    except Exception as exc:
        text = _output_fault_text(exc, out)
        if text is None:
            raise
        where = ("its commits are finished by the next run, gc or compact" if exists(intent_uri(out, run_id))
                 else "nothing of it was committed; a rerun resumes the images it finished")
        if (read_lease(out) or {}).get("holder") == run_id:  # a read-only output: the lease could not go
            where += "; its lease is left behind: a run on this host takes it over at once, elsewhere when it expires"
        raise OutputWriteError(f"{text}; run {run_id} stopped: {where}") from None


# how a worker's output fault reads once Ray has carried it to the driver (as text: the
# exception's own chain does not survive pickling)
_REMOTE_FAULT = re.compile(r"breakscene\.errors\.OutputWriteError: (.+)|OSError: (\[Errno (?:%s)\] .+)"
                           % "|".join(str(e) for e in sorted(OUTPUT_FAULT_ERRNOS)))


def _output_fault_text(exc: Exception, out: str) -> str | None:
    """What to tell the user when ``exc`` is an output fault (here or in a worker); else None."""
    fault = output_fault(exc)
    if isinstance(fault, OutputWriteError):
        return str(fault)
    if fault is not None:
        return f"output {out} cannot be written: {fault}"
    found = _REMOTE_FAULT.search(str(exc))
    if found is None:
        return None
    return found.group(1) or f"output {out} cannot be written: {found.group(2)}"


@dataclass
class StageFns:
    """The stage functions the plan is built from (the scale benchmark swaps in ones that
    do nothing, to measure the plan's own cost per row)."""

    load: Callable = load_images
    segment: type = Segment
    score: Callable = score_and_select
    extract: type = Extract
    extract_group: type = ExtractGroup
    finish: Callable = finish_scored
    stage: Callable = stage_tables


def run_job(job: JobConfig, address: str | None = None, *, stages: StageFns | None = None) -> dict:
    check_job(job)  # storage settings applied; output writable and manifest readable, before any work
    started = time.perf_counter()
    run_id = new_run_id()
    out = job.output
    driver: dict[str, float] = {}
    # 1. lease, manifest shards (their header checked before any work)
    with stop_on_output_faults(out, run_id), Lease(out, run_id):
        tick = time.perf_counter()
        uri = job.manifest.uri if job.manifest else build_demo_inputs(job.demo_inputs, out)
        spec = ManifestSpec(uri=uri, columns=dict(job.manifest.columns) if job.manifest else {})
        shards = plan(spec)
        roll_forward(out)  # a run killed during its commits: finished first
        clear_staging(out)  # a dead run's uncommitted rows (the lease says none is running)
        # 2. done set: one scan of two columns of the images table
        scan = scan_images(out)
        done = DoneSet(None if job.force else done_ids(out, job.stop_after))  # hashed and sorted once
        driver["plan"] = time.perf_counter() - tick
        ray = init_ray(job.resources, address)
        done = ray.put(done) if len(done) else None  # once in the object store, for every stage that reads it
        # 3. manifest rows still to do, read by Ray Data; then the stages
        tick = time.perf_counter()
        todo, manifest_counts = _read_manifest(ray, spec, shards, done, job)
        driver["manifest"] = time.perf_counter() - tick
        n_todo = todo.count()
        print(f"run {run_id}: {manifest_counts['rows']} manifest rows, {manifest_counts['done']} already done, "
              f"{n_todo} to process, {manifest_counts['rejected']} rejected"
              + (f", {manifest_counts['duplicate']} repeating an image_uri" if manifest_counts["duplicate"] else "")
              + (f" (stop after {job.stop_after})" if job.stop_after != "extract" else ""), flush=True)
        tally = Tally()
        tick = time.perf_counter()
        fold = 0.0  # the driver's own work on the stream: the longest any stage could wait on it
        for part, grouped in _passes(todo, n_todo, job):
            for batch in _plan(ray, job, part, run_id, done, stages or StageFns(), grouped=grouped).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                start = time.perf_counter()
                tally.add(batch)
                fold += time.perf_counter() - start
        driver["stream"] = time.perf_counter() - tick
        driver["stream_fold"] = fold
        # 4. the run's commits as one unit (pipeline/intent.py): intent, one commit per table, summary
        tick = time.perf_counter()

        def complete(counts: dict) -> dict:
            driver["commit"] = time.perf_counter() - tick
            return _summary(run_id, job, uri, tally, manifest_counts, counts, time.perf_counter() - started, driver)

        summary = commit_run(out, run_id, list(_tables(job)), complete({}), known_ids=scan.column("image_id"),
                             complete=complete)
    return summary


def _tables(job: JobConfig) -> dict[str, pa.Schema]:
    return TABLES if job.stop_after == "extract" else {k: TABLES[k] for k in ("images", "masks")}


def _read_manifest(ray, spec: ManifestSpec, shards: list[str], done, job: JobConfig):
    """The rows still to do, materialised in Ray's object store (not on the driver), and
    the manifest's counts."""
    tally = ray.remote(num_cpus=0)(ManifestTally).remote()
    items = ray.data.from_items([{"uri": s} for s in shards], override_num_blocks=len(shards))
    todo = items.map_batches(read_shard, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                             fn_kwargs={"spec": {"uri": spec.uri, "columns": spec.columns}, "done": done,
                                        "tally": tally, "single": len(shards) == 1,
                                        "storage": job.storage}).materialize()
    counts = ray.get(tally.result.remote())
    ray.kill(tally)
    return todo, counts


def rows_in_groups(batch: pa.Table, grouped: bool) -> pa.Table:
    """The batch's rows of a concept group (``grouped``), or those extracted alone."""
    has_group = pc.is_valid(batch.column("group"))
    return batch.filter(has_group if grouped else pc.invert(has_group))


def _passes(todo, n_todo: int, job: JobConfig):
    """The rows to do as (dataset, grouped) passes, one after the other over the whole
    cluster: the rows extracted alone stream through the stages as always; the rows of
    concept groups follow, gathered per group after scoring (``pipeline/groups.py``).
    ``todo`` is materialised, so each pass reads it without redoing the manifest."""
    if not n_todo:
        return
    if job.stop_after != "extract":  # scoring is per image: groups change nothing
        yield todo, False
        return
    kwargs = {"batch_format": "pyarrow", "num_cpus": 0.25}
    grouped = todo.map_batches(rows_in_groups, fn_kwargs={"grouped": True}, **kwargs)
    n_grouped = grouped.count()
    if n_grouped:  # large groups capped while their rows are small (no pixels fetched yet)
        grouped = grouped.groupby("group").map_groups(cap_group, fn_kwargs={"max_images": job.groups.max_images},
                                                      **kwargs).materialize()
    if n_grouped < n_todo:
        yield (todo.map_batches(rows_in_groups, fn_kwargs={"grouped": False}, **kwargs) if n_grouped else todo), False
    if n_grouped:
        yield grouped, True


def _plan(ray, job: JobConfig, todo, run_id: str, done, fns: StageFns, grouped: bool = False):
    """The stages on Ray Data: blocks of up to ``ROWS_PER_BLOCK`` rows through the cheap
    stages, smaller ones into extraction (seconds per image: every actor gets work); the
    rows of concept groups (``grouped``) into extraction one whole group per call."""
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
    claims = ray.remote(num_cpus=0)(ContentClaims).remote()
    n = todo.count()
    ds = todo.repartition(target_num_rows_per_block=min(ROWS_PER_BLOCK, max(1, n // 8)))
    # several images per load task: fetches are I/O, a batch shares the task's start-up
    ds = ds.map_batches(fns.load, batch_size=8, batch_format=FORMAT, num_cpus=plan["load"]["num_cpus"],
                        fn_kwargs={"storage": job.storage, "claims": claims})
    # the same CPU share as load, so that Ray Data fuses the two into one task per block
    ds = ds.map_batches(skip_done, batch_size=None, batch_format=FORMAT, num_cpus=plan["load"]["num_cpus"],
                        fn_kwargs={"done": done})
    # several images per Segment call: SAM encodes them in one batched forward
    seg_batch = job.segmenter.image_batch if job.segmenter.kind in ("sam", "tiny-sam") else 8
    ds = ds.map_batches(fns.segment, batch_size=seg_batch, batch_format=FORMAT, num_cpus=plan["segment"]["num_cpus"],
                        num_gpus=seg_gpus,
                        compute=ActorPoolStrategy(min_size=1, max_size=plan["segment"]["actors"]),
                        fn_constructor_kwargs={"settings": SegmentSettings.from_job(job)})
    ds = ds.map_batches(fns.score, batch_size=8, batch_format=FORMAT, num_cpus=plan["score"]["num_cpus"],
                        fn_kwargs={"settings": SelectSettings.from_job(job)})
    extract_kwargs = {"num_cpus": plan["extract"]["num_cpus"], "num_gpus": ext_gpus,
                      "compute": ActorPoolStrategy(min_size=1, max_size=max(1, plan["extract"]["actors"])),
                      "fn_constructor_kwargs": {"settings": ExtractSettings.from_job(job), "run_id": run_id,
                                                "threads": None if has_gpu else res.num_cpus}}
    if extract and grouped:
        # Ray Data's own grouping: every row of a group in one call (a shuffle, after scoring)
        ds = ds.groupby("group").map_groups(fns.extract_group, batch_format=FORMAT, **extract_kwargs)
        last_cpus, stage_rows = 0.1, 256
    elif extract:
        block = min(EXTRACT_ROWS_PER_BLOCK, max(1, n // (4 * res.extract_actors)))
        ds = ds.repartition(target_num_rows_per_block=block)
        # a whole small block per call: Extract works row by row inside a call (one image on
        # the GPU at a time), and a call per row cost Ray Data's batching once per row
        ds = ds.map_batches(fns.extract, batch_size=block, batch_format=FORMAT, **extract_kwargs)
        last_cpus, stage_rows = 0.1, 256  # small extraction blocks gathered into fewer staged files
    else:  # score-only: no extraction stage, so no diffusion model is ever loaded
        # score, finish and stage share a CPU share: Ray Data fuses them into one task per
        # block (a batch size for stage would gather blocks, and fewer score tasks run at once)
        last_cpus, stage_rows = plan["score"]["num_cpus"], None
        ds = ds.map_batches(fns.finish, batch_size=None, batch_format=FORMAT, num_cpus=last_cpus)
    return ds.map_batches(fns.stage, batch_size=stage_rows, batch_format=FORMAT, num_cpus=last_cpus,
                          fn_kwargs={"out": job.output, "run_id": run_id, "storage": job.storage})


def _summary(run_id, job, manifest, tally: Tally, mcounts: dict, counts, seconds, driver) -> dict:
    c = dict(tally.counts)
    rejected = [{"image_id": m["image_id"], "error": m["error"], "manifest_file": m["manifest_file"],
                 "manifest_row": m["manifest_row"]} for m in mcounts["messages"]]
    # the manifest's own counts: rejected rows failed, rows already done resumed, repeated URIs duplicates
    for status, more in ((Status.FAILED, "rejected"), (Status.RESUMED, "done"), (Status.DUPLICATE, "duplicate")):
        c[status.value] += mcounts[more]
    # a grown group's earlier images were done (left out of the manifest's rows to do) and
    # are learned again: counted as this run's, not as resumed
    c[Status.RESUMED.value] -= tally.relearned
    shown = [s.value for s in Status if s != Status.SCORED or job.stop_after == "score"]
    return {
        "run_id": run_id, "job": job.name, "manifest": manifest, "output": job.output, "stop_after": job.stop_after,
        "counts": {s: c[s] for s in shown},
        "duplicates": mcounts["duplicates"] + tally.duplicates,  # repeated URIs (manifest), then contents
        "errors": tally.errors + rejected,
        "manifest_rows": mcounts["rows"],
        "relearned": tally.relearned,
        "seconds": round(seconds, 3), "seconds_per_stage": tally.seconds,
        "driver_seconds": {k: round(v, 3) for k, v in driver.items()},
        "images_per_hour": round(c[Status.OK.value] / seconds * 3600, 2) if seconds > 0 else 0.0,
        "tables": counts,
    }


__all__ = ["run_job", "StageFns", "cleanup_partial", "new_run_id",
           "SUMMARY_SCHEMA"]
