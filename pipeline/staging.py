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

SUMMARY_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("manifest_row", pa.int64()), ("manifest_label", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("seconds_load", pa.float64()),
    ("seconds_segment", pa.float64()), ("seconds_score", pa.float64()), ("seconds_extract", pa.float64()),
])


def skip_done(batch: pd.DataFrame, done: pa.Array | None) -> pd.DataFrame:
    """Rows whose content-hash id (known only after loading) the images table already
    holds as done: marked ``resumed`` and passed on without work."""
    if done is None or not len(done) or batch.empty:
        return batch
    ids = pa.array(batch["image_id"].astype(str).tolist(), pa.string())
    hit = pc.fill_null(pc.is_in(ids, value_set=done), False).to_numpy(zero_copy_only=False)
    hit &= (batch["status"] == "ok").to_numpy()
    if hit.any():
        batch = batch.copy()
        batch.loc[hit, "status"] = "resumed"
        batch.loc[hit, "image_bytes"] = b""
    return batch


def finish_scored(batch: pd.DataFrame, run_id: str) -> pd.DataFrame:
    """A score-only run's last stage (no extraction, no diffusion model): each image's
    rows are its masks with their quality and selection, status ``scored``."""
    from .stages import build_record

    rows = batch.to_dict("records")
    for row in rows:
        row["image_bytes"] = b""
        if row["status"] in ("duplicate", "resumed"):
            continue
        if row["status"] == "ok":
            row["status"] = R.SCORED
        row["record"] = json.dumps(build_record(row, None, run_id, ""))
    return pd.DataFrame(rows)


def stage_tables(batch: pd.DataFrame, out: str, run_id: str, storage: dict | None = None) -> pa.Table:
    """Write this batch's images / masks / concepts rows as Parquet into the run's
    staging area; return the batch's summary rows."""
    from breakscene.storage import configure

    configure(storage or {})
    records = [json.loads(r) for r in batch["record"] if isinstance(r, str) and r]
    if records:
        for name, table in R.table_rows(records).items():
            T.stage_rows(out, run_id, name, table)
    summary = []
    for row in batch.to_dict("records"):
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
