"""The extraction run's checks before any work, beside the shared ones (``batchjob.preflight``):
the Delta table writer (delta-rs, an S3 client of its own) reaches the output with this
process's settings, and the job's output and manifest are usable. Each failure is one
error naming the location and what happened."""
from __future__ import annotations

import contextlib
import re
import uuid

from breakscene.errors import OutputError
from breakscene.files.output_checks import check_plain_prefix, check_writable
from breakscene.files.storage import is_remote

from batchjob.preflight import check_manifest, check_output_folder
from pipeline.config import JobConfig
from pipeline.tables import delta_options


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
