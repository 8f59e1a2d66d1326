"""``python -m benchmarks scale``: what a nightly run costs with a large history.

For each store (local disk, and an S3 server on 127.0.0.1 run by moto in its own process)
and each history size H, the output is filled directly (not by running models) with H
images already done: their records, and the images / masks / concepts Delta tables
written over a few commits as nights would. Then, with Ray already started:
- a run whose manifest lists only the H done images: every second of it is bookkeeping
  outside the stages (``bookkeeping_s``);
- the nightly increment: the same manifest plus ``--new`` new images (small generated
  pictures with user masks) in score-only mode (``increment_s``, and its driver phases).
Besides, on local disk: score-only throughput over ``--throughput-images`` new images,
and the plan's own cost per row with stages that do nothing (full plan shape, with the
extract actor pool, and the score-only shape).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

NIGHTS = 5  # commits the history is written in


def add_parser(sub) -> None:
    sc = sub.add_parser("scale", help="nightly run cost vs history size (local disk and an S3 server)")
    sc.add_argument("--histories", type=int, nargs="+", default=[10_000, 100_000], help="images already done")
    sc.add_argument("--new", type=int, default=200, help="new images in the nightly increment")
    sc.add_argument("--throughput-images", type=int, default=5000, help="new images for score-only images/s (0: skip)")
    sc.add_argument("--overhead-rows", type=int, nargs=2, default=[200, 2000],
                    help="rows through do-nothing stages (small, large): per-row overhead from the difference")
    sc.add_argument("--overhead-reps", type=int, default=3, help="runs of each size (the fastest counts)")
    sc.add_argument("--bookkeeping-reps", type=int, default=3,
                    help="nothing-new runs per history size (the fastest counts)")
    sc.add_argument("--stores", nargs="*", default=["local", "s3"], choices=["local", "s3"],
                    help="where the history runs go (none: only throughput and overhead)")
    sc.add_argument("--size", type=int, default=64, help="side of the generated new images (px)")
    sc.add_argument("--s3-records", type=int, default=10_000,
                    help="records written on the S3 server (runs never read them; at most this many are put)")
    sc.add_argument("--cpus", type=int, default=2)


# -- inputs -------------------------------------------------------------------------------

def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _new_images(n: int, size: int) -> list[tuple[bytes, bytes]]:
    """(image, mask) pairs: a coloured box on noise, its mask. A few distinct pictures
    are enough (ids are explicit, so equal content is not deduplicated)."""
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(min(n, 16)):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        mask = np.zeros((size, size), np.uint8)
        a, b = size // 4 + i % 4, 3 * size // 4 - i % 3
        img[a:b, a:b] = [200, 40 + 10 * i, 40]
        mask[a:b, a:b] = 255
        pairs.append((_png(img), _png(mask)))
    return pairs


def _history_tables(h: int, start: int = 0) -> dict[str, pa.Table]:
    """H done images as the three tables' rows: 2 masks and 2 concepts each."""
    from pipeline.records import CONCEPTS_SCHEMA, IMAGES_SCHEMA, MASKS_SCHEMA, TABLES
    ids = [f"hist-{i:09d}" for i in range(start, start + h)]
    n = len(ids)
    rle = {"size": [64, 64], "counts": "0`1d0"}
    images = pa.table({
        "image_id": ids, "image_uri": [f"s3://dataset/img/{i}.jpg" for i in ids], "manifest_row": range(start, start + n),
        "width": [512] * n, "height": [512] * n, "status": ["ok"] * n, "error": pa.nulls(n, pa.string()),
        "warnings": [[] for _ in range(n)], "mask_source": ["user"] * n, "n_masks": [2] * n, "n_concepts": [2] * n,
        "seconds_load": [0.01] * n, "seconds_segment": [0.02] * n, "seconds_score": [0.01] * n,
        "seconds_extract": [30.0] * n, "bundle_uri": [f"out/bundles/{i}" for i in ids], "run_id": ["history"] * n,
        "manifest_file": ["manifest.parquet"] * n, "meta": ['{"caption": "a photo"}'] * n,
        "group": pa.nulls(n, pa.string()),
    }).cast(IMAGES_SCHEMA)
    two = [i for i in ids for _ in range(2)]
    idx = [0, 1] * n
    masks = pa.Table.from_pydict({
        "image_id": two, "mask_index": idx, "source": ["user"] * 2 * n, "rle": [rle] * 2 * n,
        "area_fraction": [0.2] * 2 * n, "quality": [0.8] * 2 * n, "selected": [True] * 2 * n,
        "run_id": ["history"] * 2 * n,
    })
    masks = pa.table({name: masks.column(name) if name in masks.column_names else pa.nulls(2 * n, f.type)
                      for name, f in zip(MASKS_SCHEMA.names, MASKS_SCHEMA)}).cast(MASKS_SCHEMA)
    concepts = pa.Table.from_pydict({
        "image_id": two, "concept_index": idx, "token": [f"<asset{j}>" for j in idx], "mask_index": idx,
        "quality": [0.8] * 2 * n, "attention_iou": [0.5] * 2 * n, "final_loss": [0.1] * 2 * n,
        "bundle_uri": [f"out/bundles/{i}" for i in two], "run_id": ["history"] * 2 * n,
    })
    concepts = pa.table({name: concepts.column(name) if name in concepts.column_names else pa.nulls(2 * n, f.type)
                         for name, f in zip(CONCEPTS_SCHEMA.names, CONCEPTS_SCHEMA)}).cast(CONCEPTS_SCHEMA)
    return {"images": images, "masks": masks, "concepts": concepts}


def _write_history(out: str, h: int, records_limit: int) -> dict:
    """Tables over NIGHTS commits, and the images' records (up to ``records_limit``)."""
    from breakscene.files.storage import filesystem, join
    from pipeline.records import TABLES
    from pipeline.tables import commit
    from batchjob.preflight import claim_output_folder

    start = time.perf_counter()
    claim_output_folder(out, "pipeline")  # the history stands for earlier runs of this project
    per_night = -(-h // NIGHTS)
    for night in range(NIGHTS):
        lo = night * per_night
        if lo >= h:
            break
        rows = _history_tables(min(per_night, h - lo), lo)
        for name in ("masks", "concepts", "images"):
            commit(out, name, TABLES[name], rows[name], run_id=f"history-{night}")
    tables_s = time.perf_counter() - start
    start = time.perf_counter()
    fs, root = filesystem(join(out, "records"))
    n_records = min(h, records_limit)
    chunk = 2000
    for lo in range(0, n_records, chunk):
        batch = {}
        for i in range(lo, min(lo + chunk, n_records)):
            image_id = f"hist-{i:09d}"
            rec = {"image": {"image_id": image_id, "status": "ok", "run_id": "history"},
                   "masks": [{"image_id": image_id, "mask_index": j} for j in range(2)],
                   "concepts": [{"image_id": image_id, "concept_index": j} for j in range(2)]}
            batch[f"{root}/{image_id}.json"] = json.dumps(rec).encode()
        if "://" in out:
            fs.pipe(batch)  # concurrent puts
        else:
            os.makedirs(root, exist_ok=True)
            for path, data in batch.items():
                Path(path).write_bytes(data)
    return {"tables_s": round(tables_s, 2), "records": n_records, "records_s": round(time.perf_counter() - start, 2)}


def _write_manifest(base: str, out_manifest: str, h: int, new: int, size: int, tag: str) -> None:
    """A Parquet manifest: the H history rows (already done) and ``new`` new rows whose
    small images and masks are written beside it."""
    from breakscene.files.storage import filesystem, join

    fs, _ = filesystem(base)
    pairs = _new_images(new, size) if new else []
    files = {}
    new_rows = []
    for i in range(new):
        img, mask = pairs[i % len(pairs)]
        image_uri, mask_uri = join(base, "new", f"{tag}-{i}.png"), join(base, "new", f"{tag}-{i}-mask.png")
        files[filesystem(image_uri)[1]] = img
        files[filesystem(mask_uri)[1]] = mask
        new_rows.append((f"new-{tag}-{i:07d}", image_uri, [mask_uri]))
    if files:
        if "://" not in base:
            for path in files:
                os.makedirs(os.path.dirname(path), exist_ok=True)
        fs.pipe(files)
    ids = [f"hist-{i:09d}" for i in range(h)] + [r[0] for r in new_rows]
    table = pa.table({"key": ids,
                      "url": [f"s3://dataset/img/hist-{i:09d}.jpg" for i in range(h)] + [r[1] for r in new_rows],
                      "mask_uris": [[] for _ in range(h)] + [r[2] for r in new_rows],
                      "caption": ["a photo"] * len(ids)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=50_000)
    fs.pipe(filesystem(out_manifest)[1], buf.getvalue())


# -- runs ---------------------------------------------------------------------------------

def _job(out: str, manifest: str, *, storage: dict, stop_after: str = "score", cpus: int = 2):
    from pipeline.config import JobConfig

    return JobConfig(name="scale", output=out, manifest={"uri": manifest, "columns": {"image_uri": "url",
                                                                                        "image_id": "key"}},
                     stop_after=stop_after, model={"id": "tiny"}, segmenter={"kind": "classical"},
                     storage={"options": storage}, resources={"num_cpus": cpus}, max_failed_fraction=1.0)


def _run(job, stages=None) -> dict:
    from pipeline.run import run_job

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        summary = run_job(job, stages=stages)
    return {"wall_s": round(time.perf_counter() - start, 3), "driver_s": summary["driver_seconds"],
            "counts": summary["counts"], "seconds_per_stage": summary["seconds_per_stage"]}


@contextlib.contextmanager
def _store(kind: str, tmp: str):
    """(base URI, fsspec storage options) of an empty store."""
    if kind == "local":
        os.makedirs(f"{tmp}/local", exist_ok=True)
        yield f"{tmp}/local", {}
        return
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        for _ in range(300):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        import s3fs

        from breakscene.files.storage import configure

        opts = {"s3": {"key": "testing", "secret": "testing",
                       "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}}}
        configure(opts)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(**opts["s3"]).mkdir("scale")
        yield "s3://scale", opts
    finally:
        server.terminate()
        server.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _history_runs(args, kind: str, tmp: str) -> dict:
    result = {}
    for h in args.histories:
        with _store(kind, f"{tmp}/{kind}-{h}") as (base, storage):
            # warm-up: Ray's workers started and this store's clients made, so that the
            # numbers below are what a run does, not what a fresh process does once
            _write_manifest(base, f"{base}/warm.parquet", 0, 2, args.size, "warm")
            _run(_job(f"{base}/warm-out", f"{base}/warm.parquet", storage=storage, cpus=args.cpus))
            out = f"{base}/out"
            gen = _write_history(out, h, args.s3_records if kind == "s3" else h)
            _write_manifest(base, f"{base}/done.parquet", h, 0, args.size, "none")
            _write_manifest(base, f"{base}/nightly.parquet", h, args.new, args.size, "night")
            # nothing new: a few seconds each, repeated (the fastest counts: a busy machine
            # adds seconds to single runs, never takes them away)
            runs = [_run(_job(out, f"{base}/done.parquet", storage=storage, cpus=args.cpus))
                    for _ in range(args.bookkeeping_reps)]
            nothing = min(runs, key=lambda r: r["wall_s"])
            nightly = _run(_job(out, f"{base}/nightly.parquet", storage=storage, cpus=args.cpus))
            driver = nightly["driver_s"]
            result[str(h)] = {
                "history": gen, "bookkeeping_s": nothing["wall_s"], "bookkeeping_driver_s": nothing["driver_s"],
                "bookkeeping_runs_s": [r["wall_s"] for r in runs],
                "increment_s": nightly["wall_s"], "increment_driver_s": driver,
                "increment_outside_stream_s": round(nightly["wall_s"] - driver.get("stream", 0.0), 3),
                "increment_counts": nightly["counts"],
            }
    hs = [str(h) for h in args.histories]
    if len(hs) >= 2:
        lo, hi = result[hs[0]], result[hs[-1]]
        result["bookkeeping_ratio"] = round(hi["bookkeeping_s"] / lo["bookkeeping_s"], 3)
        result["increment_outside_stream_ratio"] = round(hi["increment_outside_stream_s"]
                                                         / lo["increment_outside_stream_s"], 3)
    return result


def _throughput(args, tmp: str) -> dict:
    with _store("local", f"{tmp}/throughput") as (base, storage):
        _write_manifest(base, f"{base}/new.parquet", 0, args.throughput_images, args.size, "tp")
        run = _run(_job(f"{base}/out", f"{base}/new.parquet", storage=storage, cpus=args.cpus))
    stream = run["driver_s"].get("stream", 0.0)
    fold = run["driver_s"].get("stream_fold", 0.0)
    per_stage = run["seconds_per_stage"]
    return {"images": args.throughput_images, "size_px": args.size, "wall_s": run["wall_s"], "stream_s": stream,
            "images_per_s": round(args.throughput_images / stream, 2) if stream else None,
            "images_per_s_wall": round(args.throughput_images / run["wall_s"], 2), "counts": run["counts"],
            "stage_ms_per_image": {k: round(v / args.throughput_images * 1000, 1) for k, v in per_stage.items()},
            # the stages hand their rows to the driver as a stream; the driver's own work on
            # it (folding the summary) is the most any stage could have waited on it
            "driver_busy_s": fold, "driver_busy_fraction": round(fold / stream, 4) if stream else None,
            "stages_waited_on_driver": bool(stream) and fold > 0.01 * stream}


# do-nothing stages: the plan's own cost per row. Each makes the one round trip every real
# stage makes (the batch's rows as dicts, and back in the batch's format), nothing more.

def _noop_load(batch, **_):
    from pipeline.row import batch_like, rows_of

    return batch_like(rows_of(batch), batch)


class _NoopActor:
    def __init__(self, **_) -> None:
        pass

    def __call__(self, batch):
        return _noop_load(batch)


_noop_score = _noop_load


def _noop_stage(batch, **_) -> pa.Table:
    from pipeline.row import rows_of
    from pipeline.staging import SUMMARY_SCHEMA

    return pa.Table.from_pylist([{"image_id": str(r["image_id"]), "manifest_row": int(r["manifest_row"]),
                                  "manifest_label": str(r["manifest_label"]), "status": str(r["status"])}
                                 for r in rows_of(batch)], schema=SUMMARY_SCHEMA)


def _overhead(args, tmp: str) -> dict:
    """Stream seconds with do-nothing stages at a small and a large row count, run in
    alternation ``--overhead-reps`` times after a warm-up run of each shape (the first run
    of a shape starts its worker processes); per row: the difference of the fastest runs.
    The fixed start-up of a run (actors, scheduling) varies by seconds on a busy machine,
    so single runs can even give a negative difference."""
    from pipeline.run import StageFns

    fns = StageFns(load=_noop_load, segment=_NoopActor, score=_noop_score, extract=_NoopActor,
                   finish=_noop_score, stage=_noop_stage)
    small, large = args.overhead_rows
    result = {}
    for shape in ("score", "extract"):
        walls: dict[int, list[float]] = {small: [], large: []}
        for i, n in enumerate([small] + [small, large] * args.overhead_reps):
            with _store("local", f"{tmp}/overhead-{shape}-{i}") as (base, storage):
                table = pa.table({"key": [f"o-{i}" for i in range(n)], "url": [f"/nowhere/{i}.png" for i in range(n)]})
                pq.write_table(table, f"{base}/m.parquet")
                run = _run(_job(f"{base}/out", f"{base}/m.parquet", storage=storage, stop_after=shape,
                                cpus=args.cpus), stages=fns)
                if i:  # not the warm-up
                    walls[n].append(run["driver_s"].get("stream", 0.0))
        result[shape] = {"stream_s": {str(k): [round(v, 3) for v in vs] for k, vs in walls.items()},
                         "per_row_ms": round((min(walls[large]) - min(walls[small])) / (large - small) * 1000, 3)}
    return result


def bench_scale(args) -> dict:
    import ray

    from benchmarks.common import machine

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        result = {"machine": machine(), "new": args.new, "histories": args.histories}
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.stores:
                result[kind] = _history_runs(args, kind, tmp)
            if args.throughput_images:
                result["score_only_throughput"] = _throughput(args, tmp)
            if args.overhead_rows and all(args.overhead_rows):
                result["per_row_overhead"] = _overhead(args, tmp)
    finally:
        if started_ray:
            ray.shutdown()
    return result
