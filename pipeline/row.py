"""The pipeline's row: one image on its way through the Ray Data stages, declared once
here as one Arrow schema with real nested columns (no JSON text), with each column's
value before any stage has run.

- the manifest stage (``shards.read_shard``, from ``manifest.manifest_fields``) fills where the row came from;
- load: ``image_bytes`` (the encoded picture, the only copy the later stages read; emptied
  after extraction), ``width``, ``height``, a content-hash ``image_id`` where none was given;
- segment: ``masks`` (RLE, source, the segmenter's scores, the user mask's URI);
- score: ``features`` (one struct per mask, the ``masks`` table's quality columns) and
  ``selected`` (indices into ``masks``);
- extract: ``bundle_uri`` (null unless a bundle was written) and ``concepts``; or
  ``record_uri`` when an earlier attempt's record already holds the image's rows;
- every stage: ``status`` (``status.Status``), ``error`` (null unless it failed or was
  skipped), ``warnings``, ``timings`` (seconds per stage).

The record (``OUT/records/<key>.json``) and the table rows are built from these columns
(``records.build_record``) only where they are written: by the extract stage, and by the
staging stage (``staging.stage_tables``).
"""
from __future__ import annotations

import pyarrow as pa

from pipeline.records import CONCEPTS_SCHEMA, FEATURE_FIELDS, MASKS_SCHEMA
from pipeline.records import Status

STAGES = ("load", "segment", "score", "extract")  # the timed stages
# one mask as segmented: the masks table's own columns, and the user mask's file (null
# for a segmenter's mask)
MASK = pa.struct([MASKS_SCHEMA.field(n) for n in ("rle", "source", "predicted_iou", "stability_score", "mask_uri")])
FEATURES = pa.struct(FEATURE_FIELDS)  # one mask's quality columns, as in the masks table
# one trained concept: the concepts table's columns but those the record adds
CONCEPT = pa.struct([f for f in CONCEPTS_SCHEMA if f.name not in ("image_id", "bundle_uri", "run_id")])
TIMINGS = pa.struct([(s, pa.float64()) for s in STAGES])

COLUMNS = (  # (name, type, value before any stage has run)
    ("image_id", pa.string(), ""),  # "" when the manifest gives none: the load stage hashes the content
    ("image_uri", pa.string(), ""),
    ("manifest_row", pa.int64(), 0),
    ("manifest_file", pa.string(), None),
    ("manifest_label", pa.string(), None),  # unique in the run: "3", or "shard.jsonl:3"
    ("meta", pa.string(), None),  # the manifest's own columns, as the images table holds them (JSON)
    ("mask_uris", pa.list_(pa.string()), []),
    ("labels", pa.list_(pa.string()), []),
    ("gt_mask_uris", pa.list_(pa.string()), []),
    ("group", pa.string(), None),  # the concept group (pipeline/groups.py); null: extracted alone
    ("image_bytes", pa.binary(), b""),
    ("width", pa.int64(), 0),
    ("height", pa.int64(), 0),
    ("status", pa.string(), Status.OK),
    ("error", pa.string(), None),
    ("warnings", pa.list_(pa.string()), []),
    ("masks", pa.list_(MASK), []),
    ("features", pa.list_(FEATURES), []),
    ("selected", pa.list_(pa.int32()), []),
    ("timings", TIMINGS, {}),
    ("bundle_uri", pa.string(), None),
    ("concepts", pa.list_(CONCEPT), []),
    ("record_uri", pa.string(), None),
    # an earlier image of a grown concept group, learned again with the group's new images
    # (pipeline/groups.py): not a manifest row of this run, so the summary counts it apart
    ("relearned", pa.bool_(), False),
)
ROW_SCHEMA = pa.schema([(name, kind) for name, kind, _ in COLUMNS])
DEFAULTS = {name: value for name, _, value in COLUMNS}


def new_row(**values) -> dict:
    """A row before any stage: ``values`` over the defaults (``image_id`` None is "", and
    ``manifest_label`` defaults to the manifest row's number)."""
    unknown = sorted(values.keys() - DEFAULTS.keys())
    if unknown:
        raise TypeError(f"not row columns: {', '.join(unknown)}")
    row = {name: value.copy() if isinstance(value, (list, dict)) else value for name, value in DEFAULTS.items()}
    row.update(values)
    row["image_id"] = row["image_id"] or ""
    if row["manifest_label"] is None:
        row["manifest_label"] = str(int(row["manifest_row"]))
    return row


def to_batch(rows: list[dict]) -> pa.Table:
    """Rows as a batch with the row schema (what every stage takes and returns)."""
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


__all__ = ["ROW_SCHEMA", "COLUMNS", "DEFAULTS", "STAGES", "MASK", "FEATURES", "CONCEPT", "TIMINGS", "Status",
           "new_row", "to_batch"]


# --------------------------------------------------------------------------------------
# What every stage function does around its work: rows in, rows out: a stage takes
# the batch's rows as dicts and gives them back as an Arrow batch with the same schema
# (``pipeline/row.py``'s row schema in a run).
#
# The run hands every stage Arrow batches (``batch_format="pyarrow"``): a pandas batch
# cost a conversion each way per call, measured at 12 ms per row for the extract stage's
# one-row batches and 1.3 ms per row at eight rows (``benchmarks/scale.py``'s do-nothing
# plan), against 0.3 and 0.04 ms as Arrow.
def rows_of(batch: pa.Table) -> list[dict]:
    """The batch's rows as dicts of Python values (nested columns as lists and dicts)."""
    return batch.to_pylist()


def batch_like(rows: list[dict], batch: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """``rows`` with ``batch``'s schema (or ``schema``, for a stage that changes the
    columns), so that every block of a run has the same types."""
    return pa.Table.from_pylist(rows, schema=schema or batch.schema)
