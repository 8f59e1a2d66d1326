"""Image manifests: one file, a folder or a glob of Parquet / JSON Lines / CSV shards on any
fsspec store, streamed by Ray Data workers (``pipeline.shards``), never gathered on the driver.

The driver only lists the shards and reads the first one's header (``plan``), so that a
missing manifest, an unknown format or a missing ``image_uri`` column stops the run with
one message before any work. Each worker then streams its shard in batches:
- columns are renamed by the job's mapping (``manifest.columns: {image_uri: url}``);
  columns the project does not know travel on as one JSON object (``meta``) into the
  ``images`` table;
- ``image_uri`` and ``image_id`` are read as strings exactly as written (CSV ``007``
  stays ``"007"``);
- rows whose explicit id the output already holds as done are dropped, a batch at a
  time, by a lookup in the prepared done set (``pipeline.shards``: O(batch x log
  history), where ``is_in`` per batch would rebuild a hash of the whole history each time);
- ``image_uri`` and ``image_id`` of any other type become text by one rule
  (``keys.id_texts``: Parquet's float 7.0 is "7", binary is UTF-8 text);
- a malformed row (a byte that is not UTF-8, a CSV row of the wrong field count, a JSON
  line that is no object or repeats a key), a refused id or a repeated explicit id is
  rejected alone, named by its file and row (the run's ``ManifestTally`` counts and keeps the first
  messages), and the rest go on; a file that repeats a column name is refused whole;
- an id-less row repeating an earlier id-less row's ``image_uri`` is a duplicate, counted
  and left out before any fetch.
"""
from __future__ import annotations

import base64
import codecs
import csv
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from breakscene.errors import BreakSceneError
from breakscene.files.storage import filesystem
from breakscene.files.strictjson import to_json

from batchjob.keys import id_problem, id_text, id_texts

COLUMNS = ("image_uri", "image_id", "mask_uris", "labels", "gt_mask_uris", "group")
LIST_COLUMNS = ("mask_uris", "labels", "gt_mask_uris")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
BATCH_ROWS = 4096  # rows per batch a shard is streamed in
CSV_BLOCK_BYTES = 1 << 20  # CSV bytes parsed at a time (a row may not be longer)
CSV_NULLS = pa.array(pacsv.ConvertOptions().null_values, pa.string())  # pyarrow's own


@dataclass
class ManifestSpec:
    """Where the manifest is and which of its columns hold the project's columns."""

    uri: str
    columns: dict[str, str] = field(default_factory=dict)  # project column -> manifest column

    def source(self, column: str) -> str:
        return self.columns.get(column, column)


def _format(path: str) -> str | None:
    name = path.lower().split("?")[0]
    return next((fmt for ext, fmt in FORMATS.items() if name.endswith(ext)), None)


def list_shards(uri: str) -> list[str]:
    """The manifest's data files, in a stable order: the file itself, every data file
    under a folder (a Parquet dataset folder included; hidden and ``_`` files such as
    ``_SUCCESS`` left out), or the matches of a glob."""
    fs, path = filesystem(uri)
    try:
        if any(c in path for c in "*?["):
            found = [p for p in fs.glob(path) if fs.isfile(p)]
        elif fs.isdir(path):
            found = [p for p in fs.find(path) if not any(part.startswith((".", "_"))
                                                         for part in p[len(path.rstrip("/")) + 1:].split("/"))]
            found = [p for p in found if _format(p)]
            if not found:
                raise BreakSceneError(f"manifest folder {uri} holds no .parquet, .jsonl or .csv file")
        elif fs.exists(path):
            found = [path]
        else:
            found = []
    except (FileNotFoundError, PermissionError, OSError) as exc:
        if isinstance(exc, BreakSceneError):
            raise
        raise BreakSceneError(f"manifest {uri} cannot be listed: {exc}") from None
    if not found:
        raise BreakSceneError(f"manifest {uri} does not exist")
    for p in found:
        if _format(p) is None:
            raise BreakSceneError(f"manifest {p}: unsupported format (use .parquet, .jsonl or .csv)")
    return [fs.unstrip_protocol(p) if "://" in uri else p for p in sorted(found)]


def _header(uri: str) -> tuple[list[str], bool]:
    """(column names, has at least one row) of one shard, reading only its start."""
    fs, path = filesystem(uri)
    fmt = _format(uri)
    with fs.open(path, "rb") as fh:
        if fmt == "parquet":
            meta = pq.ParquetFile(fh).metadata
            return meta.schema.to_arrow_schema().names, meta.num_rows > 0
        head = fh.read(1 << 16)
    # utf-8-sig: the byte-order mark spreadsheet programs write is not part of the first name
    lines = [ln for ln in head.decode("utf-8-sig", "replace").splitlines() if ln.strip()]
    if fmt == "csv":
        if not lines:
            return [], False
        names = next(iter(csv.reader([lines[0]])))
        return names, len(lines) > 1
    if not lines:
        return [], False
    try:
        first = json.loads(lines[0])
    except ValueError:
        return [], True  # reported per row by the worker
    return (list(first) if isinstance(first, dict) else []), True


def repeated_column(names: list[str]) -> str | None:
    """The first column name a header holds twice (readers would keep only one of them:
    every row would silently take the other column's value)."""
    seen: set[str] = set()
    return next((n for n in names if n in seen or seen.add(n)), None)


def plan(spec: ManifestSpec) -> list[str]:
    """The shard list, after the checks that stop a run before any work."""
    unknown = sorted(set(spec.columns) - set(COLUMNS))
    if unknown:
        raise BreakSceneError(f"manifest.columns: unknown column(s) {', '.join(unknown)}; known: {', '.join(COLUMNS)}")
    shards = list_shards(spec.uri)
    for shard in shards:
        try:
            names, has_rows = _header(shard)
        except (OSError, pa.ArrowInvalid) as exc:
            raise BreakSceneError(f"manifest {shard} cannot be parsed: {exc}") from None
        if repeated := repeated_column(names):
            raise BreakSceneError(f"manifest {shard} has the column {repeated} twice: rename one of them")
        if has_rows:
            if names and spec.source("image_uri") not in names:
                raise BreakSceneError(f"manifest {shard} has no {spec.source('image_uri')} column "
                                      f"(columns: {', '.join(names)})")
            return shards
    raise BreakSceneError(f"manifest {spec.uri} is empty: no image to process")


def _as_list(value, column: str) -> list[str]:
    """List columns may be lists, JSON strings (CSV), ``|``-separated strings or empty."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v for v in value.split("|") if v]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{column} must be a list of strings")
    return list(value)


@dataclass
class Part:
    """A batch of one shard as read: its rows (an Arrow table for Parquet and CSV, dicts
    for JSON Lines), the manifest row number of each, and the rows refused while reading
    (row -> why; not among ``items``). ``refused``: why every row of the part is refused
    (said once per shard)."""

    items: pa.Table | list[dict]
    rows: np.ndarray
    bad: dict[int, str] = field(default_factory=dict)
    refused: str = ""


def _not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 (byte {exc.object[exc.start]:#04x} at {exc.start})"


def _unique_keys(pairs: list[tuple]) -> dict:
    """A JSON object whose keys are unique (``json`` would keep the last of a repeated one)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise ValueError(f"the key {repeated_column([k for k, _ in pairs])} appears twice")
    return obj


def _json_row(line: bytes, spec: ManifestSpec) -> dict:
    """One JSON line as a row (raises ValueError naming what is wrong with it)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(_not_utf8(exc)) from None
    try:
        item = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"not a JSON object: {text[:80]!r}")
    for name in (spec.source("image_uri"), spec.source("image_id")):
        if name in item:
            try:
                item[name] = id_text(item[name])
            except ValueError as exc:
                raise ValueError(f"{name} {exc}") from None
    return item


def _json_parts(fh, spec: ManifestSpec) -> Iterator[Part]:
    """JSON Lines, a line at a time: row = line number, blank lines skipped, a line that is
    not UTF-8 or not a JSON object refused alone."""
    items, rows, bad = [], [], {}
    for row, line in enumerate(fh):
        if row == 0:
            line = line.removeprefix(codecs.BOM_UTF8)  # what Windows tools write first
        if not line.strip():
            continue
        try:
            items.append(_json_row(line, spec))
            rows.append(row)
        except ValueError as exc:
            bad[row] = str(exc)
        if len(items) + len(bad) >= BATCH_ROWS:
            yield Part(items, np.array(rows, np.int64), bad)
            items, rows, bad = [], [], {}
    if items or bad:
        yield Part(items, np.array(rows, np.int64), bad)


class CsvRows:
    """Numbers a CSV's rows around the rows its parser refused: pyarrow's
    ``invalid_row_handler`` skips a row of the wrong field count and says where it was
    (with ``use_threads=False``), and here it is named and its neighbours keep their numbers."""

    def __init__(self) -> None:
        self.refused: dict[int, str] = {}  # data row -> why, not yet placed among a batch's rows
        self.next = 0

    def handler(self, row) -> str:
        if row.number is None:  # position unknown: fail the shard from here rather than misnumber
            return "error"
        # number: 1-based, counting the header and not blank lines; data rows count from 0
        self.refused[row.number - 2] = f"{row.actual_columns} fields where the header has {row.expected_columns}"
        return "skip"

    def place(self, n: int) -> tuple[np.ndarray, dict[int, str]]:
        """The row numbers of the next batch's ``n`` rows, and the refused rows before them."""
        rows = np.arange(self.next, self.next + n, dtype=np.int64)
        for skipped in sorted(self.refused):
            if not n or skipped > rows[-1]:
                break
            rows[rows >= skipped] += 1
        self.next = int(rows[-1]) + 1 if n else self.next
        return rows, {r: self.refused.pop(r) for r in sorted(self.refused) if r < self.next}


def _csv_reader(fh, names: list[str] | None, numbering: CsvRows):
    # every column read as bytes: a bad byte or a type change in a later block must fail
    # its row, not the rest of the shard (pyarrow's inference fixes types on the first block)
    types = {n: pa.binary() for n in names or []}
    return pacsv.open_csv(fh, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, use_threads=False),
                          parse_options=pacsv.ParseOptions(invalid_row_handler=numbering.handler),
                          convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=False))


def _csv_parts(fh, spec: ManifestSpec) -> Iterator[Part]:
    try:  # the names first (pyarrow reads the first block for them), then every column as bytes
        names = _csv_reader(fh, None, CsvRows()).schema.names
    except pa.ArrowInvalid as exc:
        if "Empty CSV file" in str(exc):
            return
        raise
    fh.seek(0)
    numbering = CsvRows()
    for batch in _csv_reader(fh, names, numbering):
        rows, skipped = numbering.place(batch.num_rows)
        yield _csv_part(pa.Table.from_batches([batch]), rows, skipped, spec)
    if numbering.refused:
        yield Part([], np.zeros(0, np.int64), dict(numbering.refused))


def _csv_part(table: pa.Table, rows: np.ndarray, bad: dict[int, str], spec: ManifestSpec) -> Part:
    """A CSV batch read as bytes -> text, rows holding a byte that is not UTF-8 refused,
    meta columns typed per batch."""
    if repeated_column(table.column_names):
        return _refused(table, rows, bad)
    problems: dict[int, str] = {}
    for name, column in zip(table.column_names, table.columns):
        for i, value in _invalid_utf8(column):
            problems.setdefault(i, f"{name} is {value}")
    table, rows = _drop(table, rows, problems, bad)
    known = {spec.source(c) for c in COLUMNS}
    columns = [pc.cast(c, pa.string()) for c in table.columns]
    columns = [c if n in known else _typed(c) for n, c in zip(table.column_names, columns)]
    return _with_id_texts(pa.table(columns, names=table.column_names), rows, bad, spec)


def _invalid_utf8(column: pa.ChunkedArray) -> list[tuple[int, str]]:
    """(index, why) of the values that are not UTF-8 (one vectorised check when all are)."""
    try:
        pc.cast(column, pa.string())
        return []
    except pa.ArrowInvalid:
        pass
    found = []
    for i, value in enumerate(column.to_pylist()):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as exc:
            found.append((i, _not_utf8(exc)))
    return found


def _typed(texts: pa.ChunkedArray) -> pa.ChunkedArray:
    """A CSV meta column as numbers or booleans where every value of the batch reads as one
    (as pyarrow would infer: "", "NA", "null", ... are null), else the text as written."""
    values = pc.if_else(pc.is_in(texts, CSV_NULLS), pa.scalar(None, pa.string()), texts)
    for kind in (pa.int64(), pa.float64(), pa.bool_()):
        try:
            return pc.cast(values, kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
    return texts


def _drop(table: pa.Table, rows: np.ndarray, problems: dict[int, str], bad: dict[int, str]):
    """The table without the rows of ``problems`` (batch indexes), which go to ``bad``."""
    if not problems:
        return table, rows
    bad.update({int(rows[i]): why for i, why in problems.items()})
    keep = np.ones(len(rows), bool)
    keep[list(problems)] = False
    return table.filter(pa.array(keep)), rows[keep]


def _with_id_texts(table: pa.Table, rows: np.ndarray, bad: dict[int, str], spec: ManifestSpec) -> Part:
    """The id and URI columns as text by the one rule (``keys.id_texts``); rows whose
    value is no id refused."""
    problems: dict[int, str] = {}
    for name in (spec.source("image_uri"), spec.source("image_id")):
        if name in table.column_names:
            texts, refused = id_texts(table.column(name))
            table = table.set_column(table.column_names.index(name), name, texts)
            for i, why in refused.items():
                problems.setdefault(i, f"{name} {why}")
    table, rows = _drop(table, rows, problems, bad)
    return Part(table, rows, bad)


def _refused(table: pa.Table, rows: np.ndarray, bad: dict[int, str]) -> Part:
    return Part(table, rows, bad, refused=f"has the column {repeated_column(table.column_names)} twice: "
                                          "its rows are refused (rename one of them)")


def _parquet_parts(fh, spec: ManifestSpec) -> Iterator[Part]:
    start = 0
    for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS):
        table = pa.Table.from_batches([batch])
        rows = np.arange(start, start + table.num_rows, dtype=np.int64)
        start += table.num_rows
        if repeated_column(table.column_names):
            yield _refused(table, rows, {})
        else:
            yield _with_id_texts(table, rows, {}, spec)


def read_parts(uri: str, spec: ManifestSpec) -> Iterator[Part]:
    """One shard, streamed in parts of up to ``BATCH_ROWS`` rows."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as fh:
        yield from {"parquet": _parquet_parts, "csv": _csv_parts, "json": _json_parts}[_format(uri)](fh, spec)


def row_ids(items: pa.Table | list[dict], spec: ManifestSpec) -> pa.Array:
    """The part's explicit ids as strings (null where absent)."""
    col = spec.source("image_id")
    if isinstance(items, list):
        return pa.array([r.get(col) or None for r in items], pa.string())
    if col not in items.column_names:
        return pa.nulls(items.num_rows, pa.string())
    ids = items.column(col)
    return pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)


def row_label(file: str, row: int, single: bool) -> str:
    return str(row) if single else f"{file.rsplit('/', 1)[-1]}:{row}"


def _meta_value(value):
    """JSON for what json cannot write: bytes as UTF-8 text (base64 when not text),
    timestamps as ISO 8601, decimals as numbers' text (the ids' rule)."""
    try:
        return id_text(value)
    except ValueError:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return "base64:" + base64.b64encode(bytes(value)).decode("ascii")
        return str(value)


def manifest_fields(raw: dict, spec: ManifestSpec, file: str, row: int, label: str) -> dict:
    """One manifest row's fields in the project's column names, where it came from, and
    its other columns as ``meta`` JSON (raises ValueError naming the problem)."""
    uri = raw.get(spec.source("image_uri"))
    if uri is None or str(uri) == "":
        raise ValueError(f"{spec.source('image_uri')} is empty")
    image_id = raw.get(spec.source("image_id"))
    image_id = None if image_id in (None, "") else str(image_id)
    if image_id is not None and (problem := id_problem(image_id)):
        raise ValueError(problem)
    lists = {c: _as_list(raw.get(spec.source(c)), spec.source(c)) for c in LIST_COLUMNS}
    group = group_of(raw.get(spec.source("group")), lists, spec)
    known = {spec.source(c) for c in COLUMNS}
    meta = {k: v for k, v in raw.items() if k not in known and v is not None}
    return dict(image_id=image_id, image_uri=str(uri), manifest_row=row, manifest_file=file, manifest_label=label,
                meta=to_json(meta, default=_meta_value, sort_keys=True) if meta else None, group=group, **lists)


def group_of(value, lists: dict[str, list[str]], spec: ManifestSpec) -> str | None:
    """The row's concept group (None: extracted alone). A grouped row names its masks and
    one label per mask: the labels are what match its masks to the other images' masks."""
    value = id_text(value)
    if value is None or not value.strip():
        return None
    if problem := id_problem(value):
        raise ValueError(problem.replace("image_id", spec.source("group"), 1))
    masks, labels = spec.source("mask_uris"), spec.source("labels")
    if not lists["mask_uris"]:
        raise ValueError(f"{spec.source('group')} {value!r} needs {masks}: a group's images are matched by their "
                         f"masks' {labels}")
    if len(lists["labels"]) != len(lists["mask_uris"]):
        raise ValueError(f"{spec.source('group')} {value!r} needs one {labels} entry per {masks} entry "
                         f"({len(lists['labels'])} for {len(lists['mask_uris'])})")
    found = [label.strip() for label in lists["labels"]]
    if not all(found):
        raise ValueError(f"{labels} of a grouped row may not be empty")
    if len(set(found)) != len(found):
        raise ValueError(f"{labels} names one object twice in one image: a label is one object")
    lists["labels"] = found
    return value


def read_manifest(uri: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Every row of a small manifest on the driver (the robustness study's scenes): the
    same parsing, but the first bad row raises. Rows have ``COLUMNS`` (lists as lists,
    ``image_id`` None when absent), ``manifest_row`` and ``meta``."""
    spec = ManifestSpec(uri=uri, columns=columns or {})
    rows = []
    for shard in plan(spec):
        for part in read_parts(shard, spec):
            if part.refused:
                raise BreakSceneError(f"manifest {shard} {part.refused}")
            if part.bad:
                row = min(part.bad)
                raise BreakSceneError(f"manifest {shard} row {row}: {part.bad[row]}")
            raws = part.items if isinstance(part.items, list) else part.items.to_pylist()
            for i, raw in zip(part.rows.tolist(), raws):
                try:
                    r = manifest_fields(raw, spec, shard, i, str(i))
                except ValueError as exc:
                    raise BreakSceneError(f"manifest {shard} row {i}: {exc}") from None
                rows.append({"image_uri": r["image_uri"], "image_id": r["image_id"] or None,
                             **{c: r[c] for c in LIST_COLUMNS},
                             "manifest_row": len(rows), "meta": r["meta"]})
    return rows
