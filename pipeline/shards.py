"""The extraction run's first Ray Data stage: manifest shards streamed into the pipeline's
rows (``pipeline.row``), rows already done skipped by the done set, repeated ids and URIs
claimed once through the run's ``ManifestTally`` actor. Parsing a manifest is
``batchjob.manifest``'s (the study reads its scenes with it too)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob.keys import id_texts
from batchjob.manifest import ManifestSpec, Part, manifest_fields, read_parts, row_ids, row_label
from batchjob.settings import apply_storage
from pipeline.row import ROW_SCHEMA, new_row

MAX_MESSAGES = 1000  # rejected-row messages kept for the summary (the count is always exact)


class ManifestTally:
    """One per run (a Ray actor): counts rows per outcome, keeps the first rejected-row
    messages, and owns the explicit ids and the id-less rows' URIs seen this run, so that
    a repeated id is processed once and a repeated URI is fetched once (the row that
    arrives first keeps it: within a shard, the earlier row)."""

    def __init__(self) -> None:
        self.counts = {"rows": 0, "done": 0, "rejected": 0, "duplicate": 0}
        self.rejected: list[dict] = []
        self.duplicates: list[dict] = []
        self.owner: dict[str, str] = {}
        self.uri_owner: dict[str, str] = {}

    def claim_ids(self, ids: list[str], labels: list[str]) -> list[str]:
        return [self.owner.setdefault(i, label) for i, label in zip(ids, labels)]

    def claim(self, ids: list[str], id_labels: list[str], uris: list[str],
              uri_labels: list[str]) -> tuple[list[str], list[str]]:
        """A batch's explicit ids and id-less URIs in one call: the owner of each."""
        return (self.claim_ids(ids, id_labels),
                [self.uri_owner.setdefault(u, label) for u, label in zip(uris, uri_labels)])

    def report(self, rows: int, done: int, rejected: list[dict], more_rejected: int = 0,
               duplicates: list[dict] = (), more_duplicates: int = 0) -> None:
        """``more_*``: rows beyond the messages a worker kept."""
        self.counts["rows"] += rows
        self.counts["done"] += done
        self.counts["rejected"] += len(rejected) + more_rejected
        self.counts["duplicate"] += len(duplicates) + more_duplicates
        self.rejected.extend(rejected[: max(0, MAX_MESSAGES - len(self.rejected))])
        self.duplicates.extend(list(duplicates)[: max(0, MAX_MESSAGES - len(self.duplicates))])

    def result(self) -> dict:
        return {**self.counts, "messages": self.rejected, "duplicates": self.duplicates}


@dataclass
class ShardCounts:
    """What one shard reports to the run's ManifestTally, once, at its end."""

    rows: int = 0
    done: int = 0
    next_row: int = 0  # the row after the last one read
    messages: list[dict] = field(default_factory=list)
    more: int = 0  # rejected rows beyond the messages kept
    duplicates: list[dict] = field(default_factory=list)
    more_duplicates: int = 0
    refused: bool = False  # the shard's rows are refused whole (said once)

    def reject(self, entries: list[dict], count: int | None = None) -> None:
        """``count`` rows rejected (default: one per entry); beyond MAX_MESSAGES only the count."""
        kept = entries[: max(0, MAX_MESSAGES - len(self.messages))]
        self.messages.extend(kept)
        self.more += (len(entries) if count is None else count) - len(kept)

    def duplicate(self, entries: list[dict]) -> None:
        kept = entries[: max(0, MAX_MESSAGES - len(self.duplicates))]
        self.duplicates.extend(kept)
        self.more_duplicates += len(entries) - len(kept)


def _rejected(uri: str, row: int, why: str, image_id: str | None = None) -> dict:
    return {"manifest_file": uri, "manifest_row": row, "image_id": image_id,
            "error": f"manifest {uri} row {row}: {why}"}


def read_shard(batch: dict, spec: dict, done, tally, single: bool,
               storage: dict | None = None):
    """Ray Data ``map_batches`` generator over shard items ({"uri", "index"}): yields the
    stage rows of rows still to do, in Arrow tables of up to ``BATCH_ROWS`` rows. Counts
    go to ``tally`` once per shard (and when a shard fails), not once per batch.
    ``done``: see ``doneset.resolve``; ``storage``: the job's storage settings
    (``StorageConfig`` as a dict), applied as every stage applies them."""
    apply_storage(storage)
    spec_ = ManifestSpec(**spec)
    done = resolve(done)
    for uri in batch["uri"]:
        counts = ShardCounts()
        yield from _scan(str(uri), spec_, done, tally, single, counts)
        _call(tally, "report", counts.rows, counts.done, counts.messages, counts.more, counts.duplicates,
              counts.more_duplicates)


def _scan(uri: str, spec: ManifestSpec, done, tally, single: bool, counts: ShardCounts) -> Iterator[pa.Table]:
    try:
        for part in read_parts(uri, spec):
            out = _todo(part, uri, spec, done, tally, single, counts)
            if out:
                yield pa.Table.from_pylist(out, schema=ROW_SCHEMA)
    except (OSError, pa.ArrowInvalid, UnicodeDecodeError) as exc:  # a shard that cannot be read fails alone
        counts.rows += 1
        counts.reject([{"manifest_file": uri, "manifest_row": counts.next_row, "image_id": None,
                        "error": f"manifest {uri} cannot be read from row {counts.next_row}: "
                                 f"{type(exc).__name__}: {exc}"}])


def _todo(part: Part, uri: str, spec: ManifestSpec, done, tally, single: bool, counts: ShardCounts) -> list[dict]:
    """The part's stage rows still to do; its counts and rejected rows into ``counts``."""
    n = len(part.rows)
    counts.rows += n + len(part.bad)
    numbers = [*part.rows.tolist(), *part.bad]
    counts.next_row = max([counts.next_row, *(r + 1 for r in numbers)])
    if part.refused:  # said once per shard, every row counted
        said, counts.refused = counts.refused, True
        counts.reject([] if said else [{"manifest_file": uri, "manifest_row": min(numbers, default=0),
                                        "image_id": None, "error": f"manifest {uri} {part.refused}"}],
                      count=n + len(part.bad))
        return []
    rejected = [_rejected(uri, r, why) for r, why in sorted(part.bad.items())]
    keep = np.arange(n) if done is None else np.flatnonzero(~done.contains(row_ids(part.items, spec)))
    counts.done += n - len(keep)
    items = part.items
    raws = [items[i] for i in keep] if isinstance(items, list) else items.take(pa.array(keep, pa.int64())).to_pylist()
    out = []
    for i, raw in zip(keep, raws):
        row = int(part.rows[i])
        try:
            out.append(new_row(**manifest_fields(raw, spec, uri, row, row_label(uri, row, single))))
        except ValueError as exc:
            rejected.append(_rejected(uri, row, str(exc)))
    duplicates: list[dict] = []
    out = _claim_rows(out, tally, rejected, duplicates)
    counts.reject(rejected)
    counts.duplicate(duplicates)
    return out


def _claim_rows(rows: list[dict], tally, rejected: list[dict], duplicates: list[dict]) -> list[dict]:
    """One call to the run's tally per part: a row whose explicit id an earlier row of
    this run holds is rejected; an id-less row whose image_uri an earlier id-less row
    holds is a duplicate, left out before any fetch (its picture is the earlier row's:
    100,000 rows of one URI cost what reading them costs, not a trip through every stage)."""
    if not rows:
        return rows
    explicit = [r for r in rows if r["image_id"]]
    anonymous = [r for r in rows if not r["image_id"]]
    id_owners, uri_owners = _call(tally, "claim", [r["image_id"] for r in explicit],
                                  [r["manifest_label"] for r in explicit], [r["image_uri"] for r in anonymous],
                                  [r["manifest_label"] for r in anonymous])
    dropped = set()
    for r, owner in zip(explicit, id_owners):
        if owner != r["manifest_label"]:
            dropped.add(id(r))
            rejected.append({"manifest_file": r["manifest_file"], "manifest_row": r["manifest_row"],
                             "image_id": r["image_id"],
                             "error": f"manifest: duplicate image_id {r['image_id']!r} (first at row {owner})"})
    for r, owner in zip(anonymous, uri_owners):
        if owner != r["manifest_label"]:
            dropped.add(id(r))
            duplicates.append({"manifest_row": r["manifest_row"], "image_id": None,
                               "note": f"same image_uri as manifest row {owner}: fetched and processed once"})
    return [r for r in rows if id(r) not in dropped]


def _call(tally, method: str, *args):
    """A ManifestTally method: on the run's actor, or on a plain instance (tests)."""
    if isinstance(tally, ManifestTally):
        return getattr(tally, method)(*args)
    import ray

    return ray.get(getattr(tally, method).remote(*args))


# --------------------------------------------------------------------------------------
# The done set: the ids the ``images`` table holds as done, looked up by every batch of
# the manifest scan (``shards.read_shard``) and again after loading (``staging.skip_done``).
#
# Why not ``pyarrow.compute.is_in(ids, value_set=done)`` per batch: it builds a hash table
# of the whole value set on every call, so a scan of M manifest rows in batches of B cost
# M / B passes over the history H (measured: 8.6 ms per 4,096-row batch at H = 100,000,
# 330 ms at H = 1,000,000, i.e. a quadratic night). Here the set is prepared once, on the
# driver: a 64-bit hash of each id (pandas' ``hash_array``, the same in every process),
# sorted. A batch hashes its own ids and binary-searches them, O(B log H), and every
# candidate is confirmed by comparing the id itself, so a hash collision can never drop an
# image that is not done. Both sides turn ids into text by the manifest's one rule
# (``keys.id_texts``: a float 7.0 is "7" whether stored or looked up). The set travels to
# the workers once per stage, through Ray's object store (numpy and Arrow buffers, no
# Python object per id).
HASH_CHUNK = 1 << 20  # ids hashed at a time on the driver (bounds the Python objects made)


def hash_ids(ids: pa.Array) -> np.ndarray:
    """uint64 hash of each id (a null hashes like the empty string; callers mask nulls)."""
    ids = pc.fill_null(ids, "")
    out = np.empty(len(ids), np.uint64)
    for lo in range(0, len(ids), HASH_CHUNK):
        chunk = ids.slice(lo, HASH_CHUNK).to_numpy(zero_copy_only=False)
        out[lo:lo + len(chunk)] = pd.util.hash_array(np.asarray(chunk, dtype=object), categorize=False)
    return out


class DoneSet:
    """Ids already done, for membership tests in O(log H) per id."""

    def __init__(self, ids: pa.Array | pa.ChunkedArray | list[str] | None = None) -> None:
        if ids is None:
            ids = pa.array([], pa.string())
        elif not isinstance(ids, (pa.Array, pa.ChunkedArray)):
            ids = pa.array(ids, pa.string())
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        ids = pc.drop_null(id_texts(ids)[0])  # the manifest's rule for ids of any type
        keys = hash_ids(ids)
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.ids = ids.take(pa.array(order, pa.int64()))

    def __len__(self) -> int:
        return len(self.keys)

    def contains(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Boolean mask: which of ``ids`` are done (nulls never are)."""
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        n = len(ids)
        hit = np.zeros(n, bool)
        if not n or not len(self.keys):
            return hit
        ids = id_texts(ids)[0]  # what is refused as an id is never done
        keys = hash_ids(ids)
        pos = np.searchsorted(self.keys, keys)
        at = np.minimum(pos, len(self.keys) - 1)
        valid = pc.is_valid(ids).to_numpy(zero_copy_only=False)
        candidates = np.nonzero(valid & (self.keys[at] == keys))[0]
        if not candidates.size:
            return hit
        same = pc.equal(self.ids.take(pa.array(at[candidates])), ids.take(pa.array(candidates)))
        same = same.to_numpy(zero_copy_only=False)
        hit[candidates[same]] = True
        for i in candidates[~same]:  # a hash shared by several done ids: check them all
            j, want = int(pos[i]) + 1, ids[int(i)].as_py()
            while j < len(self.keys) and self.keys[j] == keys[i]:
                if self.ids[j].as_py() == want:
                    hit[i] = True
                    break
                j += 1
        return hit


def resolve(done) -> DoneSet | None:
    """A stage's ``done`` argument: the set, an object-store reference to it (put once by
    the driver and shared by every stage that reads it), an id array (tests), or None."""
    if done is None or isinstance(done, DoneSet):
        return done if done is None or len(done) else None
    import ray

    if isinstance(done, ray.ObjectRef):
        return resolve(ray.get(done))
    return resolve(DoneSet(done))
