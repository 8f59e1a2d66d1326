"""The last Ray Data stages: rows already done are let through untouched, a score-only
run's rows become its results, and every batch's table rows are written as Parquet into
the run's staging area (``pipeline/tables.py`` commits them once, from the driver).

What comes back to the driver is one small row per image (id, status, error, seconds per
stage), read as a stream and folded into the summary's counts: never a list of every row.
"""
from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from . import records as R
from . import tables as T
from .batches import batch_like, rows_of
from .doneset import resolve

SUMMARY_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("manifest_row", pa.int64()), ("manifest_label", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("seconds_load", pa.float64()),
    ("seconds_segment", pa.float64()), ("seconds_score", pa.float64()), ("seconds_extract", pa.float64()),
])


def skip_done(batch: pa.Table | pd.DataFrame, done) -> pa.Table | pd.DataFrame:
    """Rows whose content-hash id (known only after loading) the images table already
    holds as done: marked ``resumed`` and passed on without work. ``done``: see
    ``doneset.resolve``. Arrow batches are changed column-wise, without a row in Python."""
    done = resolve(done)
    if done is None or len(batch) == 0:
        return batch
    if isinstance(batch, pa.Table):
        hit = pa.array(done.contains(batch.column("image_id").cast(pa.string()))
                       & pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False))
        if not pc.any(hit).as_py():
            return batch
        for name, value in (("status", "resumed"), ("image_bytes", b"")):
            i = batch.schema.get_field_index(name)
            column = batch.column(i)
            batch = batch.set_column(i, batch.field(i), pc.if_else(hit, pa.scalar(value, column.type), column))
        return batch
    hit = done.contains(pa.array(batch["image_id"].astype(str).tolist(), pa.string()))
    hit &= (batch["status"] == "ok").to_numpy()
    if hit.any():
        batch = batch.copy()
        batch.loc[hit, "status"] = "resumed"
        batch.loc[hit, "image_bytes"] = b""
    return batch


def finish_scored(batch: pa.Table | pd.DataFrame, run_id: str) -> pa.Table | pd.DataFrame:
    """A score-only run's last stage (no extraction, no diffusion model): each image's
    rows are its masks with their quality and selection, status ``scored``."""
    from .stages import build_record

    rows = rows_of(batch)
    for row in rows:
        row["image_bytes"] = b""
        if row["status"] in ("duplicate", "resumed"):
            continue
        if row["status"] == "ok":
            row["status"] = R.SCORED
        row["record"] = json.dumps(build_record(row, None, run_id, ""))
    return batch_like(rows, batch)


def stage_tables(batch: pa.Table | pd.DataFrame, out: str, run_id: str, storage: dict | None = None) -> pa.Table:
    """Write this batch's images / masks / concepts rows as Parquet into the run's
    staging area; return the batch's summary rows."""
    from breakscene.storage import configure

    configure(storage or {})
    rows = rows_of(batch)
    records = [json.loads(r["record"]) for r in rows if isinstance(r["record"], str) and r["record"]]
    if records:
        for name, table in R.table_rows(records).items():
            T.stage_rows(out, run_id, name, table)
    summary = []
    for row in rows:
        timings = json.loads(row.get("timings") or "{}")
        summary.append({"image_id": row["image_id"], "manifest_row": int(row["manifest_row"]),
                        "manifest_label": row.get("manifest_label") or str(row["manifest_row"]),
                        "status": row["status"], "error": row["error"] or None,
                        **{f"seconds_{k}": timings.get(k) for k in ("load", "segment", "score", "extract")}})
    return pa.Table.from_pylist(summary, schema=SUMMARY_SCHEMA)


class Tally:
    """The run summary's counts, folded from the summary rows as they stream in."""

    STATUSES = ("ok", "failed", "skipped", "resumed", "duplicate", R.SCORED)

    def __init__(self, max_messages: int = 1000) -> None:
        self.counts = dict.fromkeys(self.STATUSES, 0)
        self.seconds: dict[str, float] = {}
        self.errors: list[dict] = []
        self.duplicates: list[dict] = []
        self.max_messages = max_messages

    def add(self, table: pa.Table) -> None:
        for item in pc.value_counts(table.column("status")).to_pylist():
            self.counts[item["values"]] = self.counts.get(item["values"], 0) + item["counts"]
        for stage in ("load", "segment", "score", "extract"):
            total = pc.sum(table.column(f"seconds_{stage}")).as_py()
            if total is not None:
                self.seconds[stage] = round(self.seconds.get(stage, 0.0) + total, 3)
        for status, into in (("failed", self.errors), ("duplicate", self.duplicates)):
            if len(into) >= self.max_messages:
                continue
            rows = table.filter(pc.equal(table.column("status"), status)).slice(0, self.max_messages - len(into))
            for r in rows.to_pylist():
                if status == "failed":
                    into.append({"image_id": r["image_id"], "error": r["error"]})
                else:
                    into.append({"manifest_row": r["manifest_row"], "image_id": r["image_id"], "note": r["error"]})
