"""The last Ray Data stages: rows already done are let through untouched, a score-only
run's rows become its results, and every batch's table rows are written as Parquet into
the run's staging area (``pipeline/tables.py`` commits them once, from the driver).

What comes back to the driver is one small row per image (id, status, error, seconds per
stage), read as a stream and folded into the summary's counts: never a list of every row.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from breakscene.files.strictjson import finite

from pipeline.records import build_record, read_record, table_rows
from pipeline.tables import stage_rows, staging_dir
from batchjob.artifacts import write_output
from batchjob.settings import apply_storage
from pipeline.shards import resolve
from pipeline.row import STAGES
from pipeline.records import Status

SUMMARY_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("manifest_row", pa.int64()), ("manifest_label", pa.string()),
    ("status", pa.string()), ("error", pa.string()), *[(f"seconds_{s}", pa.float64()) for s in STAGES],
    ("relearned", pa.bool_()),
])


def _set(batch: pa.Table, name: str, values) -> pa.Table:
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, batch.field(i), values)


def _where(batch: pa.Table, hit, values: dict) -> pa.Table:
    """``batch`` with ``values`` (column -> one value) in the rows of ``hit``, column-wise."""
    for name, value in values.items():
        column = batch.column(name)
        batch = _set(batch, name, pc.if_else(hit, pa.scalar(value, column.type), column))
    return batch


def skip_done(batch: pa.Table, done) -> pa.Table:
    """Rows whose content-hash id (known only after loading) the images table already
    holds as done: marked ``resumed`` and passed on without work. ``done``: see
    ``doneset.resolve``. Changed column-wise, without a row in Python."""
    done = resolve(done)
    if done is None or len(batch) == 0:
        return batch
    hit = pa.array(done.contains(batch.column("image_id").cast(pa.string()))
                   & pc.equal(batch.column("status"), Status.OK.value).to_numpy(zero_copy_only=False))
    if not pc.any(hit).as_py():
        return batch
    return _where(batch, hit, {"status": Status.RESUMED.value, "image_bytes": b""})


def finish_scored(batch: pa.Table) -> pa.Table:
    """A score-only run's last stage (no extraction, no diffusion model): rows still ok
    become ``scored`` (their masks with their quality and selection are what the run
    stages), and no row carries its pixels on."""
    batch = _set(batch, "image_bytes", pa.repeat(pa.scalar(b"", pa.binary()), len(batch)))
    return _where(batch, pc.equal(batch.column("status"), Status.OK.value), {"status": Status.SCORED.value})


def table_records(batch: pa.Table, run_id: str) -> list[dict]:
    """The records of the batch's rows that add table rows: every row but duplicates and
    rows already done, built from the row (with each mask's ``mask_uri``), and the
    rows an earlier attempt's record holds (``record_uri``), as that record has them."""
    status = batch.column("status")
    new = pc.invert(pc.is_in(status, pa.array([Status.DUPLICATE.value, Status.RESUMED.value])))
    kept = pc.or_(new, pc.is_valid(batch.column("record_uri")))
    records = []
    for row in batch.drop_columns(["image_bytes"]).filter(kept).to_pylist():
        if row["record_uri"] is not None:
            records.append(read_record(row["record_uri"]))
            continue
        # finite: as a record read back from its JSON (a non-finite value is null)
        record = finite(build_record(row, run_id))
        for entry, mask in zip(record["masks"], row["masks"]):
            entry["mask_uri"] = mask["mask_uri"]
        records.append(record)
    return [r for r in records if r is not None]


def summary_rows(batch: pa.Table) -> pa.Table:
    """One small row per image for the driver's counts, taken column-wise."""
    timings = batch.column("timings")
    columns = {name: batch.column(name) for name in ("image_id", "manifest_row", "manifest_label", "status", "error")}
    columns.update({f"seconds_{s}": pc.struct_field(timings, s) for s in STAGES})
    columns["relearned"] = batch.column("relearned")
    return pa.table(columns).cast(SUMMARY_SCHEMA)


def stage_tables(batch: pa.Table, out: str, run_id: str, storage: dict | None = None) -> pa.Table:
    """Write this batch's images / masks / concepts rows as Parquet into the run's
    staging area; return the batch's summary rows. ``storage``: the job's storage
    settings (``StorageConfig`` as a dict), applied as every stage applies them."""
    apply_storage(storage)
    records = table_records(batch, run_id)
    if records:
        for name, table in table_rows(records).items():
            write_output(staging_dir(out, run_id), lambda: stage_rows(out, run_id, name, table))
    return summary_rows(batch)


class Tally:
    """The run summary's counts, folded from the summary rows as they stream in."""

    STATUSES = tuple(s.value for s in Status)

    def __init__(self, max_messages: int = 1000) -> None:
        self.counts = dict.fromkeys(self.STATUSES, 0)
        self.seconds: dict[str, float] = {}
        self.errors: list[dict] = []
        self.duplicates: list[dict] = []
        self.max_messages = max_messages
        self.relearned = 0  # earlier images of grown concept groups: done before, learned again

    def add(self, table: pa.Table) -> None:
        self.relearned += pc.sum(table.column("relearned")).as_py() or 0
        for item in pc.value_counts(table.column("status")).to_pylist():
            self.counts[item["values"]] = self.counts.get(item["values"], 0) + item["counts"]
        for stage in STAGES:
            total = pc.sum(table.column(f"seconds_{stage}")).as_py()
            if total is not None:
                self.seconds[stage] = round(self.seconds.get(stage, 0.0) + total, 3)
        for status, into in ((Status.FAILED, self.errors), (Status.DUPLICATE, self.duplicates)):
            if len(into) >= self.max_messages:
                continue
            rows = table.filter(pc.equal(table.column("status"), status.value)).slice(0, self.max_messages - len(into))
            for r in rows.to_pylist():
                if status == Status.FAILED:
                    into.append({"image_id": r["image_id"], "error": r["error"]})
                else:
                    into.append({"manifest_row": r["manifest_row"], "image_id": r["image_id"], "note": r["error"]})
