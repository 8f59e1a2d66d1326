"""Per-image records (the done-marker of an extraction) and the table rows they hold.

Each extracted image gets ``OUT/records/<key>.json`` (``keys.storage_key`` of its id: an
id is never a path as given), written by the extract stage after its bundle is committed.
A record with status ``ok`` or ``skipped`` marks the image done for the extract stage's
own check (a retried task, a driver killed before its commit). The tables themselves are
Delta Lake tables (``pipeline/tables.py``), committed once per run from the rows the
workers staged: a run never reads the records of earlier runs.
"""
from __future__ import annotations

import enum
import hashlib
import json

import pyarrow as pa

from breakscene.quality.evidence import EVIDENCE_COLUMNS
from breakscene.files.storage import is_remote, join, read_bytes

from pipeline.tables import commit, counts, read_table as read_delta_table
from batchjob.artifacts import read_json_folder, write_json
from batchjob.keys import storage_key


# --------------------------------------------------------------------------------------
# What became of an image in a run: the one set of outcome names the stages, the
# summary and the ``images`` table's ``status`` column use (a ``StrEnum``: each member is
# its text, so it is written to Arrow, JSON and the tables as is).
if hasattr(enum, "StrEnum"):
    StrEnum = enum.StrEnum
else:  # Python 3.10: the same behaviour (each member is its text, also in str() and f-strings)
    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return format(str(self.value), spec)


class Status(StrEnum):
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"  # no mask good enough to extract: a final outcome, like ok
    RESUMED = "resumed"  # done by an earlier run (the tables or a record say so)
    DUPLICATE = "duplicate"  # the same content as an earlier row of this run: processed once
    SCORED = "scored"  # a score-only run's outcome: masks scored and selected, not extracted

DONE_STATUSES = (Status.OK, Status.SKIPPED)
SCORED = Status.SCORED  # a score-only run's outcome: masks scored and selected, not yet extracted
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
    # schema version 4: the image's concept group (null: extracted alone, and in older rows)
    ("group", pa.string()),
])
# a mask's quality columns (``breakscene.quality.score.score_masks``; the row's ``features``)
FEATURE_FIELDS = [
    ("area_fraction", pa.float64()), ("center_fraction", pa.float64()), ("n_components", pa.int32()),
    ("largest_component_fraction", pa.float64()), ("hole_fraction", pa.float64()), ("compactness", pa.float64()),
    ("roughness", pa.float64()), ("border_contact", pa.float64()), ("max_overlap", pa.float64()),
    ("predicted_iou", pa.float64()), ("stability_score", pa.float64()), ("gt_iou", pa.float64()),
    # quality = predicted IoU; the model's version and the image evidence it read
    ("quality", pa.float64()), ("quality_version", pa.string()), *[(c, pa.float64()) for c in EVIDENCE_COLUMNS],
]
MASKS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("mask_index", pa.int32()), ("source", pa.string()),
    ("rle", pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])),
    *FEATURE_FIELDS, ("selected", pa.bool_()), ("run_id", pa.string()),
    # schema version 3: the user mask's file (null for a segmenter's mask and in older rows)
    ("mask_uri", pa.string()),
])
CONCEPTS_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("concept_index", pa.int32()), ("token", pa.string()), ("mask_index", pa.int32()),
    ("init_word", pa.string()), ("quality", pa.float64()), ("attention_iou", pa.float64()),
    ("assigned_mask", pa.int32()), ("mass_in_mask", pa.float64()), ("final_loss", pa.float64()),
    ("bundle_uri", pa.string()), ("grid_uri", pa.string()), ("run_id", pa.string()),
    # schema version 4: the concept's group and the label naming its object (the manifest's
    # labels; null where none was given, and in older rows)
    ("group", pa.string()), ("label", pa.string()),
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


def read_record(uri: str) -> dict | None:
    """The record at ``uri`` (``record_uri``), or None where there is none."""
    try:
        return json.loads(read_bytes(uri))
    except FileNotFoundError:
        return None


def build_record(row: dict, run_id: str) -> dict:
    """The image's rows for the three tables, from its pipeline row (``pipeline/row.py``):
    the record the extract stage writes, and what the staging stage stages."""
    found, feats, chosen = row["masks"], row["features"], row["selected"]
    image_id, bundle = row["image_id"], row["bundle_uri"] or ""
    timings = row["timings"] or {}
    image = {
        "image_id": image_id, "image_uri": row["image_uri"], "manifest_row": int(row["manifest_row"]),
        "width": int(row["width"]), "height": int(row["height"]), "status": str(row["status"]),
        "error": row["error"], "warnings": list(row["warnings"]), "mask_source": found[0]["source"] if found else "",
        "n_masks": len(found), "n_concepts": len(chosen) if row["bundle_uri"] else 0,
        **{f"seconds_{k}": timings.get(k) for k in ("load", "segment", "score", "extract")},
        "bundle_uri": bundle, "run_id": run_id, "manifest_file": row["manifest_file"], "meta": row["meta"],
        "group": row["group"],
    }
    masks = [{"image_id": image_id, "mask_index": i, "source": f["source"], "rle": f["rle"],
              **(feats[i] if i < len(feats) else {}), "selected": i in chosen, "run_id": run_id}
             for i, f in enumerate(found)]
    concepts = [_in_order({**c, "image_id": image_id, "bundle_uri": bundle, "run_id": run_id}, CONCEPTS_SCHEMA)
                for c in row["concepts"]]
    return {"image": image, "masks": masks, "concepts": concepts}


def _in_order(values: dict, schema: pa.Schema) -> dict:
    return {name: values[name] for name in schema.names}


def read_records(out: str) -> dict[str, dict]:
    """Every record under OUT/records (a tool for tests and benchmarks: runs never call
    it, since it reads history object by object)."""
    return {rec["image"]["image_id"]: rec for rec in read_json_folder(join(out, "records")) if "image" in rec}


def table_rows(records: list[dict], extra_images: list[dict] = ()) -> dict[str, pa.Table]:
    """The three tables' rows held by ``records`` (missing columns null)."""
    rows = {
        "images": [r["image"] for r in records] + list(extra_images),
        "masks": [m for r in records for m in r.get("masks", [])],
        "concepts": [c for r in records for c in r.get("concepts", [])],
    }
    return {name: pa.Table.from_pylist(rows[name], schema=schema) for name, schema in TABLES.items()}


def write_tables(out: str, records: list[dict], extra_images: list[dict] = (), *, run_id: str = "records") -> dict[str, int]:
    """Commit the rows held by ``records`` into the Delta tables (one commit per table;
    images already in the tables are replaced). Returns each table's current row count."""
    tables = table_rows(records, extra_images)
    ids = tables["images"].column("image_id")
    known = scan_images(out, columns=["image_id"]).column("image_id")
    import pyarrow.compute as pc

    replace = set(pc.filter(ids, pc.is_in(ids, value_set=known)).to_pylist()) if len(known) else set()
    for name in sorted(TABLES, key=lambda n: n == "images"):
        commit(out, name, TABLES[name], tables[name], run_id=run_id, replace_ids=replace)
    return counts(out, TABLES)


def scan_images(out: str, columns=("image_id", "status")) -> pa.Table:
    """A few columns of the current images table: how a run finds what is done."""
    return read_delta_table(out, "images", IMAGES_SCHEMA, columns=list(columns))


def done_ids(out: str, stop_after: str = "extract") -> pa.Array:
    """Ids whose current images row needs no more work for a run that stops after
    ``stop_after`` (one scan of two columns of the images table)."""
    import pyarrow.compute as pc

    t = scan_images(out)
    return pc.filter(t.column("image_id"), pc.is_in(t.column("status"), pa.array(DONE_FOR[stop_after]))).combine_chunks()


def read_table(out: str, name: str, version: int | None = None) -> pa.Table:
    """The current rows of table ``name`` (or those of an earlier ``version``)."""
    return read_delta_table(out, name, TABLES[name], version=version)


def clear_partial_bundle(out: str, image_id: str) -> int:
    """Remove what a killed attempt left of this image's bundle: local temporary folders
    beside it (an object store's partial prefix is replaced when the bundle is published).
    Only this image's names are touched; no listing of other bundles."""

    return clear_partial_folder(bundle_uri(out, image_id))


def clear_partial_folder(target: str) -> int:
    """``clear_partial_bundle`` for the bundle at ``target`` (a group's bundle too)."""
    if is_remote(target):
        return 0
    import glob
    import shutil

    parent, name = target.rsplit("/", 1)
    leftovers = glob.glob(f"{glob.escape(parent)}/.{glob.escape(name)}.tmp-*")
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return len(leftovers)
