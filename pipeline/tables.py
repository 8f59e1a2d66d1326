"""The output tables (``OUT/images``, ``OUT/masks``, ``OUT/concepts``) as Delta Lake tables.

Why Delta (``deltalake``, delta-rs): a table grows by one commit per run that adds only
that run's files, keeps every earlier version (time travel), compacts small files
(``optimize.compact``) and opens in DuckDB (``delta_scan``), pandas / pyarrow, Polars and
Spark without this project. Iceberg gives the same guarantees but needs a catalog service
for commits on an object store; Delta's log is plain files under the table.

A run's rows are written as Parquet by the workers into ``OUT/_staging/<run_id>/<table>/``
(``stage_rows``); the driver commits them once at the end, all tables as one unit
(``pipeline/intent.py``):
- images the tables do not hold yet are appended (no scan of the table);
- images the tables already hold (a failed image retried, a scored image extracted,
  ``force``) are replaced in the same commit by a ``merge``: the image's new row updates
  the old one, and in ``masks`` / ``concepts`` rows of a replaced image that the new
  attempt no longer has are deleted. Readers see exactly one current row per image (per
  mask, per concept), and older versions keep the earlier attempts.
"""
from __future__ import annotations

import contextlib
import io
import re
import uuid

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from breakscene.errors import OutputError
from breakscene.files.output_checks import check_plain_prefix, check_writable
from breakscene.files.storage import (S3_PROTOCOLS, filesystem, io_settings, is_remote, join, s3_settings,
                                      write_bytes)

from batchjob.preflight import check_manifest, check_model, check_output_folder
from pipeline.config import JobConfig

# 3: masks.mask_uri; 4: images.group, concepts.group and concepts.label (tables of an
# older version are read and appended to as they are: the new columns are added by the
# first commit of a newer version, null in older rows)
SCHEMA_VERSION = 4
STAGING = "_staging"
# merge keys: one current row per image, per (image, mask), per (image, concept)
KEYS = {"images": ("image_id",), "masks": ("image_id", "mask_index"), "concepts": ("image_id", "concept_index")}
DEFAULT_RETENTION_HOURS = 168  # Delta's own default: a week of history readable by time travel


def with_version(name: str, schema: pa.Schema) -> pa.Schema:
    """The table's Arrow schema carrying its name and schema version (Parquet metadata)."""
    return schema.with_metadata({"breakscene.table": name, "breakscene.schema_version": str(SCHEMA_VERSION)})


def table_uri(out: str, name: str) -> str:
    return join(out, name)


def delta_options(uri: str) -> dict | None:
    """delta-rs storage options for ``uri``: the endpoint, region and credentials that
    s3fs and the lease use too (``storage.s3_settings``: the job file, then the AWS
    environment, profile and instance credentials), and the same timeouts and retries."""
    if not uri.startswith(tuple(f"{p}://" for p in S3_PROTOCOLS)):
        return None
    found = s3_settings(credentials=True)
    timeout, retries = io_settings()
    ms = f"{max(1, round(timeout * 1000))}ms"
    opts = {"timeout": ms, "connect_timeout": ms, "max_retries": str(retries)}
    for ours, theirs in (("endpoint_url", "AWS_ENDPOINT_URL"), ("region", "AWS_REGION"), ("key", "AWS_ACCESS_KEY_ID"),
                         ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if found.get(ours):
            opts[theirs] = str(found[ours])
    endpoint = found["endpoint_url"] or ""
    if endpoint.startswith("http://"):
        opts["AWS_ALLOW_HTTP"] = "true"  # delta-rs refuses plain http unless told (s3fs does not)
    if endpoint and not found["region"]:
        opts["AWS_REGION"] = "us-east-1"  # signing needs one; S3-compatible servers accept it
    if found["anon"]:
        opts["AWS_SKIP_SIGNATURE"] = "true"
    return opts


def open_table(out: str, name: str, version: int | None = None):
    """The DeltaTable, or None where the table was never written."""
    from deltalake import DeltaTable

    uri = table_uri(out, name)
    if not DeltaTable.is_deltatable(uri, storage_options=delta_options(uri)):
        return None
    return DeltaTable(uri, version=version, storage_options=delta_options(uri))


def read_table(out: str, name: str, schema: pa.Schema, *, version: int | None = None,
               columns: list[str] | None = None) -> pa.Table:
    """The table's current rows (or those of ``version``); empty with ``schema`` if none."""
    dt = open_table(out, name, version)
    if dt is None:
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    return dt.to_pyarrow_table(columns=columns)


def schema_version(out: str, name: str) -> int | None:
    """The schema version the table was created with (later columns are added by the
    commits of later versions, each of which records its own version)."""
    dt = open_table(out, name)
    return None if dt is None else _created_version(dt)


def _created_version(dt) -> int | None:
    field = dt.schema().to_arrow().field("image_id")
    meta = field.metadata or {}
    return int(meta.get(b"breakscene.schema_version", meta.get("breakscene.schema_version", 0)) or 0) or None


def staging_dir(out: str, run_id: str) -> str:
    return join(out, STAGING, run_id)


def stage_rows(out: str, run_id: str, name: str, table: pa.Table) -> None:
    """Write one batch of a table's rows as a Parquet file of this run's staging area
    (called by workers; the driver commits the staged files once)."""
    if table.num_rows == 0:
        return
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(join(staging_dir(out, run_id), name, f"{uuid.uuid4().hex}.parquet"), buf.getvalue())


def staged(out: str, run_id: str, name: str, schema: pa.Schema):
    """What run ``run_id`` staged for table ``name``, as one pyarrow dataset; None if nothing."""
    fs, root = filesystem(join(staging_dir(out, run_id), name))
    if not fs.exists(root):
        return None
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    if not files:
        return None
    return pads.dataset(files, filesystem=fs, schema=schema, format="parquet")


def _sql_list(ids) -> str:
    return ", ".join("'" + i.replace("'", "''") + "'" for i in sorted(ids))


def _commit_properties(run_id: str):
    from deltalake import CommitProperties

    return CommitProperties(custom_metadata={"breakscene.run_id": run_id,
                                             "breakscene.schema_version": str(SCHEMA_VERSION)})


def commit(out: str, name: str, schema: pa.Schema, source, *, run_id: str, replace_ids=()) -> None:
    """Commit ``source`` (an Arrow table or dataset with ``schema``, or None) into table
    ``name`` in one Delta commit; rows of images in ``replace_ids`` replace theirs."""
    from deltalake import write_deltalake

    if source is None or (isinstance(source, pa.Table) and source.num_rows == 0):
        if replace_ids and (dt := open_table(out, name)) is not None:
            # replaced images without rows here this time (a retry that failed earlier)
            dt.delete(f"image_id IN ({_sql_list(replace_ids)})", commit_properties=_commit_properties(run_id))
        return

    dt = open_table(out, name)
    schema = _field_versioned(schema, SCHEMA_VERSION if dt is None else _created_version(dt))
    reader = _reader(source, schema)
    uri = table_uri(out, name)
    opts = delta_options(uri)
    props = _commit_properties(run_id)
    if dt is None or not replace_ids:
        # new images only: an append adds files without reading the table
        write_deltalake(uri if dt is None else dt, reader, mode="append", schema_mode="merge",
                        name=None if dt is not None else name,
                        description=None if dt is not None else
                        f"breakscene {name} table, schema version {SCHEMA_VERSION}",
                        storage_options=opts, commit_properties=props)
        return
    keys = KEYS[name]
    predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    merger = dt.merge(reader, predicate, source_alias="s", target_alias="t", merge_schema=True,
                      commit_properties=props).when_matched_update_all().when_not_matched_insert_all()
    if len(keys) > 1:  # a replaced image's masks / concepts that its new attempt no longer has
        merger = merger.when_not_matched_by_source_delete(f"t.image_id IN ({_sql_list(replace_ids)})")
    merger.execute()


def _field_versioned(schema: pa.Schema, version: int | None) -> pa.Schema:
    """Delta keeps field metadata in its log (not Parquet schema metadata): the schema
    version the table was created with travels on the key column. An existing table keeps
    its own (delta-rs refuses to merge a field whose metadata differs), so a newer version
    appends its added columns to an older table."""
    i = schema.get_field_index("image_id")
    field = schema.field(i)
    if version is not None:
        field = field.with_metadata({"breakscene.schema_version": str(version)})
    return schema.set(i, field)


def _reader(source, schema: pa.Schema) -> pa.RecordBatchReader:
    if isinstance(source, pads.Dataset):
        batches = source.to_batches()
    elif isinstance(source, pa.Table):
        batches = source.to_batches()
    else:
        batches = source
    return pa.RecordBatchReader.from_batches(schema, (b.cast(schema) for b in batches if b.num_rows))


def counts(out: str, tables) -> dict[str, int]:
    result = {}
    for name in tables:
        dt = open_table(out, name)
        result[name] = 0 if dt is None else int(dt.count())
    return result


def clear_staging(out: str, keep=()) -> int:
    """Remove staging areas left by runs that died before writing their commit intent (the
    lease makes sure none of them is still running); those named in ``keep`` (runs with an
    intent, to be rolled forward) stay. Returns how many were removed."""
    fs, root = filesystem(join(out, STAGING))
    if not fs.exists(root):
        return 0
    removed = 0
    for path in fs.ls(root, detail=False):
        if path.rstrip("/").rsplit("/", 1)[-1] not in keep:
            fs.rm(path, recursive=True)
            removed += 1
    return removed


def compact(out: str, names, *, retention_hours: int = DEFAULT_RETENTION_HOURS) -> dict[str, dict]:
    """Rewrite each table's small files into larger ones (a new version; readers are not
    disturbed), then delete only files that Delta's log marked removed longer ago than
    ``retention_hours`` (time travel to versions within that window keeps working)."""
    result = {}
    for name in names:
        dt = open_table(out, name)
        if dt is None:
            continue
        metrics = dt.optimize.compact()
        deleted = dt.vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)
        result[name] = {"files_added": metrics.get("numFilesAdded", 0),
                        "files_removed": metrics.get("numFilesRemoved", 0),
                        "files_deleted": len(deleted), "version": dt.version()}
    return result


__all__ = ["SCHEMA_VERSION", "KEYS", "table_uri", "delta_options", "open_table", "read_table", "stage_rows",
           "commit", "counts", "clear_staging", "compact", "schema_version"]


# --------------------------------------------------------------------------------------
# The extraction run's checks before any work, beside the shared ones (``batchjob.preflight``):
# the Delta table writer (delta-rs, an S3 client of its own) reaches the output with this
# process's settings, and the job's output and manifest are usable.
def table_store_error(exc: BaseException) -> str:
    """delta-rs' multi-line error chain in one line: what failed, the request it made (the
    endpoint it really used), the innermost cause and the server's error code."""
    text = re.sub(r"\x1b\[[0-9;]*m|↳", "", str(exc))
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("<")]
    request = re.search(r"Error performing ([A-Z]+ \w+://\S+)", text)
    code = re.search(r"<Code>([^<]+)</Code>", text)
    parts = lines[:1] + ([request.group(1)] if request else []) + lines[-1:] + ([code.group(1)] if code else [])
    return ": ".join(dict.fromkeys(parts))[:500] or type(exc).__name__


def check_table_writer(uri: str) -> None:
    """Prove that the Delta table writer (delta-rs, an S3 client of its own) reaches the
    output with this process's settings: a probe object written, listed and deleted
    through its object store. A local output is written by the same system calls that
    ``check_writable`` made."""
    if not is_remote(uri):
        return
    from deltalake.fs import DeltaStorageHandler
    from pyarrow.fs import FileSelector

    probe = f".breakscene-probe-{uuid.uuid4().hex[:8]}"
    store = None
    try:
        store = DeltaStorageHandler(uri, delta_options(uri))
        store.open_output_stream(probe).close()
        store.get_file_info_selector(FileSelector("", recursive=False))
        store.delete_file(probe)
    except Exception as exc:  # noqa: BLE001 - named below
        with contextlib.suppress(Exception):  # written, then a later step failed: leave nothing
            store.delete_file(probe)
        raise OutputError(f"output {uri} cannot be written by the Delta table writer (delta-rs): "
                          f"{table_store_error(exc)}") from None


def check_job(job: JobConfig) -> None:
    """Apply the job's storage settings to this process, then check output and manifest."""
    job.storage.apply()
    check_plain_prefix(job.output, what="output")
    check_writable(job.output, what="output", inside=True)
    check_output_folder(job.output, "pipeline")
    check_table_writer(job.output)  # delta-rs: its own S3 client, given the same settings
    if job.manifest and not any(c in job.manifest.uri for c in "*?["):  # a glob is listed by manifest.plan
        check_manifest(job.manifest.uri)
    if job.stop_after == "extract":  # a score-only run never loads the diffusion model
        check_model(job.model)
