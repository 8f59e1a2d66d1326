"""Reading an image manifest (Parquet, JSON Lines or CSV, from any fsspec URI) into
validated rows. Manifests are small (one row per image) and read on the driver, so
that every problem with them is reported before any work starts."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from breakscene.errors import BreakSceneError
from breakscene.storage import read_bytes

COLUMNS = ("image_uri", "image_id", "mask_uris", "labels", "gt_mask_uris")


def _read_table(uri: str) -> pa.Table:
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        raise BreakSceneError(f"manifest {uri} does not exist") from None
    name = uri.lower().split("?")[0]
    try:
        if name.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if name.endswith((".jsonl", ".json", ".ndjson")):
            return pajson.read_json(io.BytesIO(data)) if data.strip() else pa.table({})
        if name.endswith(".csv"):
            return pacsv.read_csv(io.BytesIO(data)) if data.strip() else pa.table({})
    except (pa.ArrowInvalid, OSError) as exc:
        raise BreakSceneError(f"manifest {uri} cannot be parsed: {exc}") from None
    raise BreakSceneError(f"manifest {uri}: unsupported format (use .parquet, .jsonl or .csv)")


def _as_list(value, column: str, row: int) -> list[str]:
    """List columns may be lists, JSON strings (CSV) or empty."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in value.split("|") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise BreakSceneError(f"manifest row {row}: {column} must be a list of strings")
    return list(value)


def read_manifest(uri: str) -> list[dict]:
    """Rows with every column of ``COLUMNS`` (lists as lists, ``image_id`` None when absent)."""
    table = _read_table(uri)
    if table.num_rows == 0:
        raise BreakSceneError(f"manifest {uri} is empty: no image to process")
    if "image_uri" not in table.column_names:
        raise BreakSceneError(f"manifest {uri} has no image_uri column (columns: {', '.join(table.column_names)})")
    unknown = sorted(set(table.column_names) - set(COLUMNS))
    if unknown:
        raise BreakSceneError(f"manifest {uri}: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
    rows = []
    for i, raw in enumerate(table.to_pylist()):
        if not raw.get("image_uri"):
            raise BreakSceneError(f"manifest {uri} row {i}: image_uri is empty")
        image_id = raw.get("image_id")
        rows.append({
            "image_uri": str(raw["image_uri"]),
            "image_id": str(image_id) if image_id not in (None, "") else None,
            "mask_uris": _as_list(raw.get("mask_uris"), "mask_uris", i),
            "labels": _as_list(raw.get("labels"), "labels", i),
            "gt_mask_uris": _as_list(raw.get("gt_mask_uris"), "gt_mask_uris", i),
            "manifest_row": i,
        })
    return rows
