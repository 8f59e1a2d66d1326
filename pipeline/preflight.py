"""Checks made by the driver before any work: the job's storage settings are applied, the
output can be written and the manifest can be read. Each failure is one error naming the
location and what happened (a file given as output, a read-only folder, no credentials,
a timeout), not a traceback after the first images."""
from __future__ import annotations

import json

from breakscene.errors import BreakSceneError, OutputError, StorageError
from breakscene.outputs import check_writable
from breakscene.storage import exists, folder_state, join, read_bytes, refuse_foreign, write_bytes

from .config import JobConfig

# Written into every pipeline or study output when its first run starts: a folder without
# it (and not empty) holds someone else's files, and no run, gc or compact touches it.
OUTPUT_MARKER = ".breakscene-output"
# outputs written before the marker existed are known by the folder only their runs make
EARLIER_OUTPUTS = {"pipeline": "runs", "study": "cells"}


def output_state(uri: str, kind: str) -> str:
    """"absent", "ours", "file" or "foreign" (see ``storage.folder_state``), for an output of
    ``kind`` ("pipeline" or "study"); another kind's output is refused here."""
    try:
        state = folder_state(uri, OUTPUT_MARKER)
        if state == "ours" and exists(join(uri, OUTPUT_MARKER)):
            written = json.loads(read_bytes(join(uri, OUTPUT_MARKER))).get("kind")
            if written != kind:
                raise OutputError(f"output {uri} holds a {written} output, not a {kind} one: choose another folder")
        if state == "foreign" and exists(join(uri, EARLIER_OUTPUTS[kind])):
            state = "ours"
    except StorageError as exc:
        raise OutputError(f"output {exc}") from None
    return state


def check_output_folder(uri: str, kind: str) -> None:
    """The output is new, empty, or one this project wrote; never someone else's folder."""
    try:
        refuse_foreign(uri, output_state(uri, kind), OUTPUT_MARKER)
    except OutputError as exc:
        raise OutputError(str(exc) if str(exc).startswith("output ") else f"output {exc}") from None


def claim_output_folder(uri: str, kind: str) -> None:
    """Mark ``uri`` as this project's output (once, before anything else is written there)."""
    if not exists(join(uri, OUTPUT_MARKER)):
        write_bytes(join(uri, OUTPUT_MARKER), json.dumps({"kind": kind, "written_by": "breakscene"}).encode())


def check_existing_output(uri: str, kind: str = "pipeline") -> None:
    """For commands that maintain an output (gc, compact): it must exist and be ours."""
    if output_state(uri, kind) != "ours":
        raise OutputError(f"{uri} is not a breakscene output (no {OUTPUT_MARKER}): nothing to do there")


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
    check_output_folder(job.output, "pipeline")
    if job.manifest and not any(c in job.manifest.uri for c in "*?["):  # a glob is listed by manifest.plan
        check_manifest(job.manifest.uri)
