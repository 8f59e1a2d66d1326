"""Small output files both drivers (the extraction run, the robustness study) write and
read back: a JSON document per finished unit of work (the done-marker: a record, a study
cell), and single Parquet files. Written through ``breakscene.files.storage`` (atomic per
object), so a marker exists only once complete."""
from __future__ import annotations

import io
import json
from typing import Callable, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from breakscene.errors import OutputWriteError
from breakscene.files.storage import describe_error, filesystem, write_bytes
from breakscene.files.strictjson import to_json

T = TypeVar("T")


def write_json(uri: str, document: dict, *, indent: int | None = None) -> str:
    write_bytes(uri, to_json(document, indent=indent).encode())
    return uri


def read_json_folder(uri: str) -> list[dict]:
    """Every ``*.json`` document directly under ``uri`` (fetched concurrently on object
    stores); [] when the folder does not exist."""
    fs, root = filesystem(uri)
    if not fs.exists(root):
        return []
    paths = [p for p in fs.ls(root, detail=False) if p.endswith(".json")]
    return [json.loads(data) for data in (fs.cat(paths).values() if paths else [])]


def write_parquet(uri: str, table: pa.Table) -> str:
    """One Parquet file, written whole (readers never see a part of it)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())
    return uri


def write_output(uri: str, call: Callable[[], T]) -> T:
    """Run ``call``, a write of ``uri`` into the output. Its failure is the output's, not the
    row's (a full disk, a read-only remount, lost credentials): every later row would fail
    the same way, so it becomes an ``OutputWriteError`` that stops the run cleanly."""
    try:
        return call()
    except OutputWriteError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified: any failure to write the output
        reason = f"{exc.strerror} ({exc.filename or uri})" if isinstance(exc, OSError) and exc.strerror else \
            describe_error(exc)[0]
        raise OutputWriteError(f"output {uri} cannot be written: {reason}") from exc
