"""Per-image records (the done-marker of an extraction) and the table rows they hold.

Each extracted image gets ``OUT/records/<key>.json`` (``keys.storage_key`` of its id: an
id is never a path as given), written by the extract stage after its bundle is committed.
A record with status ``ok`` or ``skipped`` marks the image done for the extract stage's
own check (a retried task, a driver killed before its commit). The tables themselves are
Delta Lake tables (``pipeline/tables.py``), committed once per run from the rows the
workers staged: a run never reads the records of earlier runs.
"""
from __future__ import annotations

import hashlib

import pyarrow as pa

from breakscene.quality_evidence import EVIDENCE_COLUMNS
from breakscene.storage import join

from . import tables as T
from .artifacts import read_json_folder, write_json
from .keys import storage_key

DONE_STATUSES = ("ok", "skipped")
# a score-only run's outcome: masks scored and selected, not yet extracted
SCORED = "scored"
DONE_FOR = {"extract": DONE_STATUSES, "score": DONE_STATUSES + (SCORED,)}

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_uri", pa.string()), ("manifest_row", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("warnings", pa.list_(pa.string())), ("mask_source", pa.string()), ("n_masks", pa.int32()),
    ("n_concepts", pa.int32()), ("seconds_load", pa.float64()), ("seconds_segment", pa.float64()),
    ("seconds_score", pa.float64()), ("seconds_extract", pa.float64()), ("bundle_uri", pa.string()),
    ("run_id", pa.string()),
    # where the row came from, and the manifest's own columns this project does not know (JSON)
    ("manifest_file", pa.string()), ("meta", pa.string()),
])
MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("mask_index", pa.int32()), ("source", pa.string()),
    ("rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("area_fraction", pa.float64()), ("center_fraction", pa.float64()), ("n_components", pa.int32()), ("largest_component_fraction", pa.float64()),
    ("hole_fraction", pa.float64()), ("compactness", pa.float64()), ("roughness", pa.float64()),
    ("border_contact", pa.float64()), ("max_overlap", pa.float64()), ("predicted_iou", pa.float64()),
    ("stability_score", pa.float64()), ("gt_iou", pa.float64()), ("quality", pa.float64()),
    # quality = predicted IoU; the model's version and the image evidence it read
    ("quality_version", pa.string()), *[(c, pa.float64()) for c in EVIDENCE_COLUMNS],
    ("selected", pa.bool_()), ("run_id", pa.string()),
])
CONCEPTS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("concept_index", pa.int32()), ("token", pa.string()), ("mask_index", pa.int32()),
    ("init_word", pa.string()), ("quality", pa.float64()), ("attention_iou", pa.float64()),
    ("assigned_mask", pa.int32()), ("mass_in_mask", pa.float64()), ("final_loss", pa.float64()),
    ("bundle_uri", pa.string()), ("grid_uri", pa.string()), ("run_id", pa.string()),
])
TABLES = {"images": IMAGES_SCHEMA, "masks": MASKS_SCHEMA, "concepts": CONCEPTS_SCHEMA}


def uri_id(uri: str) -> str:
    """An id for an image that could not be read (no content to hash)."""
    return "uri-" + hashlib.sha256(uri.encode()).hexdigest()[:16]


def record_uri(out: str, image_id: str) -> str:
    return join(out, "records", f"{storage_key(image_id)}.json")  # ids are data, never paths


def bundle_uri(out: str, image_id: str) -> str:
    return join(out, "bundles", storage_key(image_id))


def write_record(out: str, record: dict) -> str:
    return write_json(record_uri(out, record["image"]["image_id"]), record)


def read_records(out: str) -> dict[str, dict]:
    """Every record under OUT/records (a tool for tests and benchmarks: runs never call
    it, since it reads history object by object)."""
    return {rec["image"]["image_id"]: rec for rec in read_json_folder(join(out, "records"))}


def table_rows(records: list[dict], extra_images: list[dict] = ()) -> dict[str, pa.Table]:
    """The three tables' rows held by ``records`` (missing columns null, ``error`` null
    rather than empty on rows that did not fail)."""
    rows = {
        "images": [r["image"] for r in records] + list(extra_images),
        "masks": [m for r in records for m in r.get("masks", [])],
        "concepts": [c for r in records for c in r.get("concepts", [])],
    }
    out = {}
    for name, schema in TABLES.items():
        cols = schema.names
        out[name] = pa.Table.from_pylist([{k: _clean(k, r.get(k)) for k in cols} for r in rows[name]], schema=schema)
    return out


def _clean(column: str, value):
    return None if column == "error" and value == "" else value


def write_tables(out: str, records: list[dict], extra_images: list[dict] = (), *, run_id: str = "records") -> dict[str, int]:
    """Commit the rows held by ``records`` into the Delta tables (one commit per table;
    images already in the tables are replaced). Returns each table's current row count."""
    tables = table_rows(records, extra_images)
    ids = tables["images"].column("image_id")
    known = scan_images(out, columns=["image_id"]).column("image_id")
    import pyarrow.compute as pc

    replace = set(pc.filter(ids, pc.is_in(ids, value_set=known)).to_pylist()) if len(known) else set()
    for name in sorted(TABLES, key=lambda n: n == "images"):
        T.commit(out, name, TABLES[name], tables[name], run_id=run_id, replace_ids=replace)
    return T.counts(out, TABLES)


def scan_images(out: str, columns=("image_id", "status")) -> pa.Table:
    """A few columns of the current images table: how a run finds what is done."""
    return T.read_table(out, "images", IMAGES_SCHEMA, columns=list(columns))


def done_ids(out: str, stop_after: str = "extract") -> pa.Array:
    """Ids whose current images row needs no more work for a run that stops after
    ``stop_after`` (one scan of two columns of the images table)."""
    import pyarrow.compute as pc

    t = scan_images(out)
    return pc.filter(t.column("image_id"), pc.is_in(t.column("status"), pa.array(DONE_FOR[stop_after]))).combine_chunks()


def read_table(out: str, name: str, version: int | None = None) -> pa.Table:
    """The current rows of table ``name`` (or those of an earlier ``version``)."""
    return T.read_table(out, name, TABLES[name], version=version)


def clear_partial_bundle(out: str, image_id: str) -> int:
    """Remove what a killed attempt left of this image's bundle: local temporary folders
    beside it (an object store's partial prefix is replaced when the bundle is published).
    Only this image's names are touched; no listing of other bundles."""
    from breakscene.storage import is_remote

    if is_remote(out):
        return 0
    import glob
    import shutil

    target = bundle_uri(out, image_id)
    parent, name = target.rsplit("/", 1)
    leftovers = glob.glob(f"{glob.escape(parent)}/.{glob.escape(name)}.tmp-*")
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)
