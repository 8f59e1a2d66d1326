"""The done set: the ids the ``images`` table holds as done, looked up by every batch of
the manifest scan (``shards.read_shard``) and again after loading (``staging.skip_done``).

Why not ``pyarrow.compute.is_in(ids, value_set=done)`` per batch: it builds a hash table
of the whole value set on every call, so a scan of M manifest rows in batches of B cost
M / B passes over the history H (measured: 8.6 ms per 4,096-row batch at H = 100,000,
330 ms at H = 1,000,000, i.e. a quadratic night). Here the set is prepared once, on the
driver: a 64-bit hash of each id (pandas' ``hash_array``, the same in every process),
sorted. A batch hashes its own ids and binary-searches them, O(B log H), and every
candidate is confirmed by comparing the id itself, so a hash collision can never drop an
image that is not done. Both sides turn ids into text by the manifest's one rule
(``keys.id_texts``: a float 7.0 is "7" whether stored or looked up). The set travels to
the workers once per stage, through Ray's object store (numpy and Arrow buffers, no
Python object per id).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from batchjob.keys import id_texts

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


__all__ = ["DoneSet", "hash_ids", "resolve"]
