"""Image manifests: one file, a folder or a glob of Parquet / JSON Lines / CSV shards on any
fsspec store, read by Ray Data workers (``read_shard``), never gathered on the driver.

The driver only lists the shards and reads the first one's header (``plan``), so that a
missing manifest, an unknown format or a missing ``image_uri`` column stops the run with
one message before any work. Each worker then streams its shard in batches:
- columns are renamed by the job's mapping (``manifest.columns: {image_uri: url}``);
  columns the project does not know travel on as one JSON object (``meta``) into the
  ``images`` table;
- ``image_uri`` and ``image_id`` are read as strings exactly as written (CSV ``007``
  stays ``"007"``);
- rows whose explicit id the output already holds as done are dropped, a batch at a
  time, by a lookup in the prepared done set (``pipeline/doneset.py``: O(batch x log
  history), where ``is_in`` per batch would rebuild a hash of the whole history each time);
- a malformed row, a refused id or a repeated explicit id is rejected alone, named by its
  file and row (``ManifestTally`` counts and keeps the first messages), and the rest go on.
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from breakscene.errors import BreakSceneError
from breakscene.storage import filesystem

from .doneset import resolve
from .keys import id_problem

COLUMNS = ("image_uri", "image_id", "mask_uris", "labels", "gt_mask_uris")
LIST_COLUMNS = ("mask_uris", "labels", "gt_mask_uris")
FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv"}
BATCH_ROWS = 4096  # rows per batch a shard is streamed in
MAX_MESSAGES = 1000  # rejected-row messages kept for the summary (the count is always exact)


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
    lines = [ln for ln in head.decode("utf-8", "replace").splitlines() if ln.strip()]
    if fmt == "csv":
        if not lines:
            return [], False
        names = next(iter(__import__("csv").reader([lines[0]])))
        return names, len(lines) > 1
    if not lines:
        return [], False
    try:
        first = json.loads(lines[0])
    except json.JSONDecodeError:
        return [], True  # reported per row by the worker
    return (list(first) if isinstance(first, dict) else []), True


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
        if has_rows:
            if names and spec.source("image_uri") not in names:
                raise BreakSceneError(f"manifest {shard} has no {spec.source('image_uri')} column "
                                      f"(columns: {', '.join(names)})")
            return shards
    raise BreakSceneError(f"manifest {spec.uri} is empty: no image to process")


class ManifestTally:
    """One per run (a Ray actor): counts rows per outcome, keeps the first rejected-row
    messages, and owns the explicit ids seen this run, so that a repeated id is processed
    once (the row that arrives first keeps it: within a shard, the earlier row)."""

    def __init__(self) -> None:
        self.counts = {"rows": 0, "done": 0, "rejected": 0}
        self.rejected: list[dict] = []
        self.owner: dict[str, str] = {}

    def claim_ids(self, ids: list[str], labels: list[str]) -> list[str]:
        return [self.owner.setdefault(i, label) for i, label in zip(ids, labels)]

    def report(self, rows: int, done: int, rejected: list[dict], more_rejected: int = 0) -> None:
        """``more_rejected``: rejected rows beyond the messages a worker kept."""
        self.counts["rows"] += rows
        self.counts["done"] += done
        self.counts["rejected"] += len(rejected) + more_rejected
        self.rejected.extend(rejected[: max(0, MAX_MESSAGES - len(self.rejected))])

    def result(self) -> dict:
        return {**self.counts, "messages": self.rejected}


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


def _batches(uri: str, spec: ManifestSpec) -> Iterator[pa.Table | list]:
    """The shard as Arrow tables (Parquet, CSV) or lists of parsed lines (JSON Lines,
    where a malformed line must fail alone: a list item is a dict or an error string)."""
    fs, path = filesystem(uri)
    fmt = _format(uri)
    with fs.open(path, "rb") as fh:
        if fmt == "parquet":
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=BATCH_ROWS):
                yield pa.Table.from_batches([batch])
        elif fmt == "csv":
            strings = {spec.source(c): pa.string() for c in COLUMNS}  # ids and URIs exactly as written
            convert = pacsv.ConvertOptions(column_types=strings, strings_can_be_null=False)
            reader = pacsv.open_csv(fh, convert_options=convert,
                                    read_options=pacsv.ReadOptions(block_size=1 << 20))
            for batch in reader:
                yield pa.Table.from_batches([batch])
        else:
            chunk: list = []
            for line in io.TextIOWrapper(fh, encoding="utf-8", errors="replace"):
                if not line.strip():
                    chunk.append(None)  # keeps row numbers equal to line numbers of data
                    continue
                try:
                    item = json.loads(line)
                    chunk.append(item if isinstance(item, dict) else f"not a JSON object: {line[:80]!r}")
                except json.JSONDecodeError as exc:
                    chunk.append(f"not valid JSON ({exc.msg} at column {exc.colno})")
                if len(chunk) >= BATCH_ROWS:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk


def _ids(batch, spec: ManifestSpec) -> pa.Array:
    """The batch's explicit ids as strings (null where absent)."""
    col = spec.source("image_id")
    if isinstance(batch, list):
        return pa.array([(str(r[col]) if isinstance(r, dict) and r.get(col) not in (None, "") else None)
                         for r in batch], pa.string())
    if col not in batch.column_names:
        return pa.nulls(batch.num_rows, pa.string())
    ids = pc.cast(batch.column(col), pa.string())
    return pc.if_else(pc.equal(ids, ""), pa.scalar(None, pa.string()), ids)


def _label(file: str, row: int, single: bool) -> str:
    return str(row) if single else f"{file.rsplit('/', 1)[-1]}:{row}"


def stage_row(raw: dict, spec: ManifestSpec, file: str, row: int, label: str) -> dict:
    """One manifest row as the first stage's row (raises ValueError naming the problem)."""
    uri = raw.get(spec.source("image_uri"))
    if uri is None or str(uri) == "":
        raise ValueError(f"{spec.source('image_uri')} is empty")
    image_id = raw.get(spec.source("image_id"))
    image_id = None if image_id in (None, "") else str(image_id)
    if image_id is not None and (problem := id_problem(image_id)):
        raise ValueError(problem)
    lists = {c: _as_list(raw.get(spec.source(c)), spec.source(c)) for c in LIST_COLUMNS}
    known = {spec.source(c) for c in COLUMNS}
    meta = {k: v for k, v in raw.items() if k not in known and v is not None}
    return {"image_id": image_id or "", "image_uri": str(uri), "manifest_row": row, "manifest_file": file,
            "manifest_label": label, "meta": json.dumps(meta, default=str, sort_keys=True) if meta else None,
            **{c: json.dumps(v) for c, v in lists.items()},
            "image_bytes": b"", "width": 0, "height": 0, "status": "ok", "error": "", "warnings": "[]",
            "masks": "[]", "features": "[]", "selected": "[]", "timings": "{}", "record": ""}


def read_shard(batch: dict, spec: dict, done, tally, single: bool,
               storage: dict | None = None):
    """Ray Data ``map_batches`` generator over shard items ({"uri", "index"}): yields the
    stage rows of rows still to do, in Arrow tables of up to ``BATCH_ROWS`` rows. Counts
    go to ``tally`` once per shard (and when a shard fails), not once per batch.
    ``done``: see ``doneset.resolve``."""
    from breakscene.storage import configure

    configure(storage or {})
    spec_ = ManifestSpec(**spec)
    done = resolve(done)
    for uri in batch["uri"]:
        uri = str(uri)
        first = 0
        counts = {"rows": 0, "done": 0, "rejected": [], "more": 0}
        try:
            for part in _batches(uri, spec_):
                lines = isinstance(part, list)
                n = len(part) if lines else part.num_rows
                base, first = first, first + n
                if done is not None:
                    keep = np.flatnonzero(~done.contains(_ids(part, spec_))).tolist()
                else:
                    keep = list(range(n))
                raws = [part[i] for i in keep] if lines else part.take(pa.array(keep, pa.int64())).to_pylist()
                out, rejected = [], []
                for i, raw in zip(keep, raws):
                    if raw is None:  # a blank line
                        continue
                    row = base + i
                    try:
                        if isinstance(raw, str):
                            raise ValueError(raw)
                        out.append(stage_row(raw, spec_, uri, row, _label(uri, row, single)))
                    except ValueError as exc:
                        rejected.append({"manifest_file": uri, "manifest_row": row, "image_id": None,
                                         "error": f"manifest {uri} row {row}: {exc}"})
                out = _claim_ids(out, tally, rejected)
                blanks = sum(1 for x in part if x is None) if lines else 0
                counts["rows"] += n - blanks
                counts["done"] += n - len(keep)
                room = max(0, MAX_MESSAGES - len(counts["rejected"]))  # beyond it only the count travels
                counts["rejected"].extend(rejected[:room])
                counts["more"] += len(rejected) - len(rejected[:room])
                if out:
                    yield pa.Table.from_pylist(out, schema=STAGE_SCHEMA)
        except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:  # a malformed shard fails alone
            counts["rows"] += 1
            counts["rejected"].append({"manifest_file": uri, "manifest_row": first, "image_id": None,
                                       "error": f"manifest {uri} cannot be read from row {first}: "
                                                f"{type(exc).__name__}: {exc}"})
        _call(tally, "report", counts["rows"], counts["done"], counts["rejected"], counts["more"])


def _claim_ids(rows: list[dict], tally, rejected: list[dict]) -> list[dict]:
    """Drop rows whose explicit id an earlier row of this run holds."""
    explicit = [r for r in rows if r["image_id"]]
    if not explicit:
        return rows
    owners = _call(tally, "claim_ids", [r["image_id"] for r in explicit], [r["manifest_label"] for r in explicit])
    dropped = set()
    for r, owner in zip(explicit, owners):
        if owner != r["manifest_label"]:
            dropped.add(id(r))
            rejected.append({"manifest_file": r["manifest_file"], "manifest_row": r["manifest_row"],
                             "image_id": r["image_id"],
                             "error": f"manifest: duplicate image_id {r['image_id']!r} (first at row {owner})"})
    return [r for r in rows if id(r) not in dropped]


def _call(tally, method: str, *args):
    """A ManifestTally method: on the run's actor, or on a plain instance (tests)."""
    if isinstance(tally, ManifestTally):
        return getattr(tally, method)(*args)
    import ray

    return ray.get(getattr(tally, method).remote(*args))


STAGE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("image_uri", pa.string()), ("manifest_row", pa.int64()),
    ("manifest_file", pa.string()), ("manifest_label", pa.string()), ("meta", pa.string()),
    ("mask_uris", pa.string()), ("labels", pa.string()), ("gt_mask_uris", pa.string()),
    ("image_bytes", pa.binary()), ("width", pa.int64()), ("height", pa.int64()), ("status", pa.string()),
    ("error", pa.string()), ("warnings", pa.string()), ("masks", pa.string()), ("features", pa.string()),
    ("selected", pa.string()), ("timings", pa.string()), ("record", pa.string()),
])


def read_manifest(uri: str, columns: dict[str, str] | None = None) -> list[dict]:
    """Every row of a small manifest on the driver (the robustness study's scenes): the
    same parsing, but the first bad row raises. Rows have ``COLUMNS`` (lists as lists,
    ``image_id`` None when absent), ``manifest_row`` and ``meta``."""
    spec = ManifestSpec(uri=uri, columns=columns or {})
    shards = plan(spec)
    rows = []
    for shard in shards:
        first = 0
        for part in _batches(shard, spec):
            raws = part if isinstance(part, list) else part.to_pylist()
            for i, raw in enumerate(raws, start=first):
                if raw is None:
                    continue
                try:
                    if isinstance(raw, str):
                        raise ValueError(raw)
                    r = stage_row(raw, spec, shard, i, str(i))
                except ValueError as exc:
                    raise BreakSceneError(f"manifest {shard} row {i}: {exc}") from None
                rows.append({"image_uri": r["image_uri"], "image_id": r["image_id"] or None,
                             **{c: json.loads(r[c]) for c in LIST_COLUMNS},
                             "manifest_row": len(rows), "meta": r["meta"]})
            first += len(raws)
    return rows
