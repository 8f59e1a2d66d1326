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
"""
from __future__ import annotations

import hashlib
import re
import unicodedata

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
