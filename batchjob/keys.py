"""Storage names for image ids. A manifest's ``image_id`` is data: it never becomes a
path as given (``..``, ``a/b`` or a 1,000-character id would escape or break the output).

``storage_key`` maps every id to one file or folder name that is safe on every store:
- ids that are already plain names (lowercase ASCII letters, digits, ``_`` and ``-``, at
  most 64 characters, no ``--``) are kept as they are, so outputs stay readable;
- every other id becomes ``<slug>--<hash>``: a readable lowercase slug of at most 40
  characters and the first 16 hex digits of the SHA-256 of the exact id. Plain names
  never contain ``--``, so the two forms never meet, and ids that differ only in case
  (``Cat`` / ``cat``) get different names even on a case-insensitive store.
Keys hold no separator, no dot (so never ``.``, ``..``, a hidden name or the
``.tmp-`` of a half-written folder) and no character that needs quoting in a URI.

``id_problem`` names the ids that are refused outright (the row fails alone).

``id_text`` / ``id_texts`` are the one rule that turns a manifest value of any type into
the text of an id or URI, used wherever an id is read (the manifest's columns, the done
set's both sides): Parquet's float 7.0 and integer 7 are both ``"7"``, binary is UTF-8
text, timestamps are ISO 8601; what is no id (NaN, true/false, lists, bytes that are not
UTF-8) is refused, naming the value's kind. Text stays exactly as written.
"""
from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import math
import re
import unicodedata

import pyarrow as pa
import pyarrow.compute as pc

PLAIN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_NOT_SLUG = re.compile(r"[^a-z0-9_]+")
SLUG_CHARS = 40
HASH_CHARS = 16
# Device names Windows reserves in any case and with any extension (a store synced to a
# Windows machine could not hold them).
RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def storage_key(image_id: str) -> str:
    """A safe, bounded, case-insensitively unique file / folder name for ``image_id``."""
    if PLAIN.fullmatch(image_id) and "--" not in image_id and image_id not in RESERVED:
        return image_id
    ascii_text = unicodedata.normalize("NFKD", image_id).encode("ascii", "ignore").decode().lower()
    slug = _NOT_SLUG.sub("-", ascii_text).strip("-_")[:SLUG_CHARS].strip("-_")
    slug = re.sub(r"-{2,}", "-", slug) or "id"
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_CHARS]
    return f"{slug}--{digest}"


def id_problem(image_id: str) -> str | None:
    """Why an explicit id is refused, or None. Refused: ids of whitespace only (they read
    as "no id" but would not get the content hash an absent id gets) and ids holding
    control characters (invisible in logs and tables, and they break one-line messages).
    Everything else is accepted, whatever its length or script, through ``storage_key``."""
    if not image_id.strip():
        return f"image_id {image_id!r} is only whitespace (leave it empty to use the image's content hash)"
    bad = sorted({c for c in image_id if unicodedata.category(c) == "Cc"})
    if bad:
        return f"image_id {image_id[:80]!r} holds control character(s) {', '.join(repr(c) for c in bad)}"
    return None


def id_text(value) -> str | None:
    """A manifest value as id / URI text (None for null; the manifest reads "" as absent
    too); raises ValueError saying why a value is no id."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):  # before int: True is an int
        raise ValueError(f"is {str(value).lower()}: true/false is not an id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (float, decimal.Decimal)):
        return _number_text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"is bytes that are not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                             f"{exc.start})") from None
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    raise ValueError(f"is a {type(value).__name__}, not text or a number")


def _number_text(value: float | decimal.Decimal) -> str:
    """Integral numbers as integers (a float column's 7.0 is the id 7), others as the
    shortest text that reads back the same."""
    if not (value.is_finite() if isinstance(value, decimal.Decimal) else math.isfinite(value)):
        raise ValueError(f"is {value}: not a finite number")
    if value == int(value):
        return str(int(value))
    return str(value.normalize()) if isinstance(value, decimal.Decimal) else repr(value)


def id_texts(values: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, dict[int, str]]:
    """``id_text`` over an Arrow column: (string array, null where null or refused;
    {index: why} of the refused). Text and integer columns are converted by Arrow
    (the same text), every other type value by value."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    kind = values.type
    if pa.types.is_dictionary(kind):
        return id_texts(values.dictionary_decode())
    if pa.types.is_null(kind):
        return pa.nulls(len(values), pa.string()), {}
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind):
        return pc.cast(values, pa.string()), {}
    out, problems = [], {}
    for i, value in enumerate(values.to_pylist()):
        try:
            out.append(id_text(value))
        except ValueError as exc:
            out.append(None)
            problems[i] = str(exc)
    return pa.array(out, pa.string()), problems
