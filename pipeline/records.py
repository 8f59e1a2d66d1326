"""Per-image records (the unit of truth and the done-marker) and the Parquet tables
built from them.

Each processed image gets ``OUT/records/<image_id>.json``, written by the extract stage
after its bundle is committed. A record with status ``ok`` or ``skipped`` marks the image
done; a ``failed`` one is retried by the next run. The tables are rebuilt from all
records at the end of each run, so every image appears exactly once whatever the runs'
history (resumes, retries, killed drivers).
"""
from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from breakscene.storage import filesystem, join, write_bytes

DONE_STATUSES = ("ok", "skipped")

IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_uri", pa.string()), ("manifest_row", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("status", pa.string()), ("error", pa.string()),
    ("warnings", pa.list_(pa.string())), ("mask_source", pa.string()), ("n_masks", pa.int32()),
    ("n_concepts", pa.int32()), ("seconds_load", pa.float64()), ("seconds_segment", pa.float64()),
    ("seconds_score", pa.float64()), ("seconds_extract", pa.float64()), ("bundle_uri", pa.string()),
    ("run_id", pa.string()),
])
MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("mask_index", pa.int32()), ("source", pa.string()),
    ("rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    ("area_fraction", pa.float64()), ("center_fraction", pa.float64()), ("n_components", pa.int32()), ("largest_component_fraction", pa.float64()),
    ("hole_fraction", pa.float64()), ("compactness", pa.float64()), ("roughness", pa.float64()),
    ("border_contact", pa.float64()), ("max_overlap", pa.float64()), ("predicted_iou", pa.float64()),
    ("stability_score", pa.float64()), ("gt_iou", pa.float64()), ("quality", pa.float64()),
    ("selected", pa.bool_()),
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
    return join(out, "records", f"{image_id}.json")


def bundle_uri(out: str, image_id: str) -> str:
    return join(out, "bundles", image_id)


def write_record(out: str, record: dict) -> str:
    uri = record_uri(out, record["image"]["image_id"])
    write_bytes(uri, json.dumps(record).encode())
    return uri


def read_records(out: str) -> dict[str, dict]:
    fs, root = filesystem(join(out, "records"))
    if not fs.exists(root):
        return {}
    paths = [p for p in fs.ls(root, detail=False) if p.endswith(".json")]
    if not paths:
        return {}
    contents = fs.cat(paths)  # concurrent on object stores
    records = {}
    for data in contents.values():
        rec = json.loads(data)
        records[rec["image"]["image_id"]] = rec
    return records


def done_ids(out: str) -> set[str]:
    return {i for i, r in read_records(out).items() if r["image"]["status"] in DONE_STATUSES}


def _table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def write_tables(out: str, records: list[dict], extra_images: list[dict] = ()) -> dict[str, int]:
    """Rebuild OUT/images, OUT/masks and OUT/concepts (one Parquet file each) from records."""
    rows = {
        "images": [r["image"] for r in records] + list(extra_images),
        "masks": [m for r in records for m in r.get("masks", [])],
        "concepts": [c for r in records for c in r.get("concepts", [])],
    }
    counts = {}
    for name, schema in TABLES.items():
        table = _table(sorted(rows[name], key=_sort_key), schema)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(join(out, name, "part-0.parquet"), buf.getvalue())
        counts[name] = table.num_rows
    return counts


def _sort_key(row: dict):
    return (row.get("image_id") or "", row.get("mask_index", row.get("concept_index", 0)) or 0,
            row.get("manifest_row") or 0)


def read_table(out: str, name: str) -> pa.Table:
    fs, root = filesystem(join(out, name))
    return pq.read_table(root, filesystem=fs)
