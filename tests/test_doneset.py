import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import shards as doneset
from pipeline.shards import DoneSet, resolve


def test_membership_matches_is_in_on_awkward_ids():
    done = ["a", "", "007", "7", "Cat", "cat", "猫", "y" * 1000, "a b", "x\u0301"]
    probe = pa.array(done + [None, "A", "0007", "y" * 999, "猫猫", "b"], pa.string())
    got = DoneSet(pa.array(done + [None])).contains(probe)
    want = pc.fill_null(pc.is_in(probe, value_set=pa.array(done)), False).to_numpy(zero_copy_only=False)
    assert got.tolist() == want.tolist() and got.sum() == len(done)


def test_a_hash_collision_never_marks_an_id_done(monkeypatch):
    """Every id hashed to the same value: only the exact ids are found."""
    monkeypatch.setattr(doneset, "hash_ids", lambda ids: np.zeros(len(ids), np.uint64))
    done = DoneSet(pa.array(["b", "d", "a"]))
    assert done.contains(pa.array(["a", "c", "d", None, "e", "b"])).tolist() == [True, False, True, False,
                                                                                 False, True]


def test_empty_and_chunked_inputs():
    assert resolve(None) is None and resolve(pa.array([], pa.string())) is None
    done = resolve(pa.chunked_array([["a"], ["b"]]))
    assert len(done) == 2 and done.contains(pa.chunked_array([["b", "z"]])).tolist() == [True, False]
    assert DoneSet(["x"]).contains(pa.array([], pa.string())).tolist() == []


def test_a_batch_lookup_does_not_grow_with_the_history():
    """The reason for the set: is_in rebuilds a hash of the whole history per batch. A
    lookup of 4,096 ids costs about the same against 10,000 and 400,000 done ids."""
    batch = pa.array([f"new-{i}" for i in range(4096)])

    def lookup_s(h: int) -> float:
        done = DoneSet(pa.array([f"hist-{i:09d}" for i in range(h)]))
        done.contains(batch)
        start = time.perf_counter()
        for _ in range(5):
            done.contains(batch)
        return (time.perf_counter() - start) / 5

    small, large = lookup_s(10_000), lookup_s(400_000)
    assert large < 3 * small + 0.002, (small, large)
