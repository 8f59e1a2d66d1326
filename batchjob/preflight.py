"""Checks every driver makes before any work (the extraction run adds its own in
``pipeline.tables``): the output folder is ours or empty, the manifest can be read, and
a model folder holds its parts. Each failure is one error naming the location and
what happened (a file given as output, a read-only folder, no credentials, a timeout),
not a traceback after the first images."""
from __future__ import annotations

import json
import re
from typing import NamedTuple

from breakscene.errors import BreakSceneError, OutputError, StorageError
from breakscene.files.output_checks import check_plain_prefix
from breakscene.files.storage import (exists, filesystem, folder_state, join, read_bytes, refuse_foreign,
                                write_bytes)
from breakscene.files.strictjson import to_json
from breakscene.models.folders import check_model as check_model_parts
from batchjob.settings import ModelConfig


# Written into every pipeline or study output when its first run starts: a folder without
# it (and not empty) holds someone else's files, and no run, gc or compact touches it.
OUTPUT_MARKER = ".breakscene-output"


class EarlierLayout(NamedTuple):
    """How an output written before the marker existed is known: a layout no other tool
    makes (TensorBoard writes runs/, many tools a summary.json), i.e. a folder of this
    project's done-markers only, named in its id format, a summary with its keys, and
    what its runs always write beside them."""

    folder: str
    names: re.Pattern
    summary: str
    keys: frozenset
    also: str | None = None


EARLIER_OUTPUTS = {
    "pipeline": EarlierLayout("runs", re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}\.json"),  # pipeline.run.new_run_id
                              "summary.json", frozenset({"run_id", "counts", "tables", "manifest", "output"}),
                              also="images/_delta_log"),
    "study": EarlierLayout("cells", re.compile(r"[0-9a-f]{16}\.json"),  # robustness.grid.cell_id
                           "study.json", frozenset({"study", "cells", "measurement_rows"})),
}


def is_earlier_output(uri: str, kind: str) -> bool:
    """Whether ``uri`` has the whole layout of an output of ``kind`` written before the marker."""
    layout = EARLIER_OUTPUTS[kind]
    fs, root = filesystem(join(uri, layout.folder))
    if not fs.isdir(root) or (layout.also and not exists(join(uri, layout.also))):
        return False
    listed = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    if not listed or not all(layout.names.fullmatch(name) for name in listed):
        return False
    try:
        written = json.loads(read_bytes(join(uri, layout.summary)))
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(written, dict) and layout.keys <= written.keys()


def output_state(uri: str, kind: str) -> str:
    """"absent", "ours", "file" or "foreign" (see ``storage.folder_state``), for an output of
    ``kind`` ("pipeline" or "study"); another kind's output is refused here."""
    check_plain_prefix(uri, what="output")
    try:
        state = folder_state(uri, OUTPUT_MARKER)
        if state == "ours" and exists(join(uri, OUTPUT_MARKER)):
            written = json.loads(read_bytes(join(uri, OUTPUT_MARKER))).get("kind")
            if written != kind:
                raise OutputError(f"output {uri} holds a {written} output, not a {kind} one: choose another folder")
        if state == "foreign" and is_earlier_output(uri, kind):
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
        write_bytes(join(uri, OUTPUT_MARKER), to_json({"kind": kind, "written_by": "breakscene"}).encode())


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


def check_model(model: ModelConfig) -> None:
    """A model folder or URI holds every part its family's load reads (an SDXL folder its
    second text encoder): one error now, not a traceback from every extraction actor."""
    check_model_parts(model.id)
