"""Checks made by the driver before any work: the job's storage settings are applied, the
output can be written and the manifest can be read. Each failure is one error naming the
location and what happened (a file given as output, a read-only folder, no credentials,
a timeout), not a traceback after the first images."""
from __future__ import annotations

from breakscene.errors import BreakSceneError, StorageError
from breakscene.outputs import check_writable
from breakscene.storage import exists

from .config import JobConfig


def check_manifest(uri: str) -> None:
    try:
        found = exists(uri)
    except StorageError as exc:
        raise BreakSceneError(f"manifest {exc}") from None
    if not found:
        raise BreakSceneError(f"manifest {uri} does not exist")


def check_job(job: JobConfig) -> None:
    """Apply the job's storage settings to this process, then check output and manifest."""
    job.storage.apply()
    check_writable(job.output, what="output", inside=True)
    if job.manifest and not any(c in job.manifest.uri for c in "*?["):  # a glob is listed by manifest.plan
        check_manifest(job.manifest.uri)
